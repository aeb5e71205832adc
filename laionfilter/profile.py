"""A user's profile: the n × L coefficient matrix plus JSON metadata, in one safetensors file.

A profile is only meaningful with the bank it was learned on: it records the bank's fingerprint, and
every use of it checks that fingerprint first.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .bank import Bank, find_bank
from .errors import LaionfilterError
from .formats import PROFILE_FORMAT, validate
from .calibrate import Calibration
from .jobs import fit_processes, learning_threads
from .fit import Fit
from .jobs import run_jobs
from .learn import fit_recipe, fit_recipes, learn_device, on_trunk, shared_task_predictions
from .log import progress_bar
from .merger import Merger
from .objective import Paired, Scored
from .log import note
from .model import ScoreModel, eval_transform
from .names import check_name, child_path
from .ratings import read_ratings
from .recipe import LearnConfig
from .safefiles import read_safetensors, write_safetensors


@dataclass
class Profile:
    alpha: torch.Tensor  # [n, L]
    meta: dict[str, Any]
    path: Path | None = None  # the file it was read from or saved to

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def calibration(self) -> Calibration | None:
        """The map to the user's rating scale; None for a profile learned from pairs or without one."""
        cal = self.meta.get("calibration")
        return Calibration.from_json(cal, str(self.path or self.name)) if cal else None

    def save(self, path: str | os.PathLike) -> Path:
        self.path = write_safetensors(path, {"alpha": self.alpha}, self.meta)
        return self.path

    def check_bank(self, bank: Bank, source: str | os.PathLike = "profile") -> None:
        if self.meta["bank"]["fingerprint"] != bank.fingerprint:
            want = self.meta["bank"]
            raise LaionfilterError(
                f"{source}: profile {self.name!r} was learned on bank {want['fingerprint'][:16]} "
                f"({', '.join(self.meta['tasks'])}; at {want.get('path')}), not on {bank.path} "
                f"({bank.fingerprint[:16]}); pass --bank with the bank it was learned on")

    def find_bank(self, source: str | os.PathLike, bank: str | os.PathLike | None = None) -> Bank:
        """The bank this profile was learned on: ``bank`` if it is that one, else found by fingerprint."""
        return find_bank({**self.meta["bank"], "tasks": self.meta["tasks"]}, source, bank)

    def model(self, bank: Bank) -> ScoreModel:
        """The merged model θ_pre + Σ α τ as an ordinary module in eval mode."""
        self.check_bank(bank)
        return bank.model(bank.merged_state(self.alpha))


def load_profile(path: str | os.PathLike) -> Profile:
    tensors, meta = read_safetensors(path, what="profile")
    validate(meta, PROFILE_FORMAT, path)
    if "alpha" not in tensors:
        raise LaionfilterError(f"{path}: not a laionfilter profile (no 'alpha' tensor)")
    check_name(meta.get("name"), "profile name", path)
    alpha = tensors["alpha"]
    want = (len(meta["tasks"]), meta["layers"])
    if tuple(alpha.shape) != want:
        raise LaionfilterError(f"{path}: coefficients have shape {tuple(alpha.shape)}, its metadata says {want}")
    profile = Profile(alpha.float(), meta, Path(path))
    _ = profile.calibration  # parsed here, so that a malformed map is refused on load, not at score time
    return profile


def learn_profiles(ratings: str | os.PathLike, bank: Bank, out: str | os.PathLike, cfg: LearnConfig = LearnConfig(),
                   shards: str | None = None, progress: bool = True, name: str | None = None,
                   threads: int | None = None, jobs: int | None = None, allow_pipe: bool = False) -> list[Profile]:
    """Learn one profile per user in the ratings file; ``out`` is a file, or a folder for several users.

    ``threads``: CPU threads per fit (default: see ``learning_threads``); ``jobs``: fits at once
    (default: see ``fit_processes``); ``allow_pipe``: let ``pipe:`` shard URLs run their commands."""
    out = Path(out)
    with learning_threads(bank, threads):
        arch = bank.architecture
        table = read_ratings(ratings, eval_transform(arch), shards=shards, default_user=name or out.stem,
                             allow_pipe=allow_pipe)
        multi = table.per_user
        if multi and out.exists() and not out.is_dir():
            raise LaionfilterError(f"{out}: the ratings have a user column, so --out is a folder for their "
                                   f"profiles, and {out} is a file")
        # the folder is made with the first profile written into it, so that an interrupted run
        # leaves no empty one behind
        merger = Merger(bank, learn_device(cfg))
        processes = fit_processes(merger, jobs)
        written = []
        supports = [Scored(sup.pixels, sup.scores) if sup.pairs is None else Paired(sup.pixels, sup.pairs)
                    for sup in table.supports]
        for sup in table.supports:
            if len(sup.images) < 10:
                note(f"user {sup.user!r}: {len(sup.images)} images; the method is meant for 10 or more")
        keys = [sup.images for sup in table.supports]
        preds = shared_task_predictions(merger, supports, keys)
        merger, supports = on_trunk(merger, supports, cfg, keys)
        if cfg.fit == "linear" and len(supports) > 1:
            # users side by side: each group's users split over the processes, written once the group is
            # done (an interruption loses one group's fits at most)
            group = processes * USERS_PER_JOB
            bar = progress_bar(total=len(supports), desc="learn", unit="user", disable=not progress)
            for g in range(0, len(supports), group):
                part = supports[g:g + group]
                mine = preds[g:g + group]
                work = [functools.partial(_fit_users, merger, part[k::processes], cfg, mine[k::processes])
                        for k in range(processes)]
                fits: list = [None] * len(part)
                for k, done in enumerate(run_jobs(work, processes)):
                    fits[k::processes] = done
                for sup, result in zip(table.supports[g:g + group], fits):
                    written.append(_save(sup, result, out, multi, bank, cfg, ratings, table.sha256))
                bar.update(len(part))
            bar.close()
        else:
            for sup, support, p in zip(table.supports, supports, preds):
                result = fit_recipe(merger, support, cfg, task_preds=p, progress=progress, desc=f"learn {sup.user}",
                                    processes=processes)
                written.append(_save(sup, result, out, multi, bank, cfg, ratings, table.sha256))
        return written


# Users per process in one group of ``learn_profiles``'s side-by-side fits.
USERS_PER_JOB = 32


def _fit_users(merger: Merger, supports: list, cfg: LearnConfig, task_preds: list[np.ndarray], on_step=None) -> list[Fit]:
    """``fit_recipes`` of these users, without the expansions (not sent back from a worker process)."""
    return [replace(f, linearisations=()) for f in fit_recipes(merger, supports, cfg, task_preds, on_step=on_step)]


def _save(sup, result: Fit, out: Path, multi: bool, bank: Bank, cfg: LearnConfig, ratings, sha256: str) -> Profile:
    """The profile of one user's fit, written where ``learn_profiles`` puts it."""
    meta = {
        "format": PROFILE_FORMAT,
        "laionfilter_version": __version__,
        "name": sup.user,
        "bank": {"fingerprint": bank.fingerprint, "path": str(bank.path.resolve()),
                 "architecture": bank.manifest["architecture"]["name"]},
        "tasks": [t["name"] for t in bank.tasks],
        "layers": len(bank.layers),
        "config": cfg.to_json(),
        "init": {"method": cfg.init, "temperature": cfg.temperature,
                 # the start of a learned layer (the others hold 1/n, see "tune")
                 "alpha_per_task": result.alpha_init[:, int(result.tuned.nonzero()[0])].tolist(),
                 "tune": cfg.tune, "fixed_layers": int((~result.tuned).sum()), "fixed_value": 1.0 / bank.n},
        "zero_shot_srocc": dict(zip([t["name"] for t in bank.tasks], result.zero_shot_srocc)),
        "support_srocc_before": result.support_srocc_before,
        "support_srocc_after": result.support_srocc_after,
        "loss_curve": result.loss_curve,
        "seed": cfg.seed,
        "ratings": {"path": str(ratings), "sha256": sha256, "images": len(sup.images),
                    **({"score_min": float(np.min(sup.scores)), "score_max": float(np.max(sup.scores))}
                       if sup.pairs is None else {"pairs": len(sup.pairs), "ties": len(sup.ties)})},
        "support_metric": "SROCC" if sup.pairs is None else "pair agreement (2·fraction ordered − 1)",
        "learn_seconds": result.seconds,
    }
    if result.linearised_at:  # a linear fit: the steps it linearised at, one pass over the images each
        meta["linearised_at"] = list(result.linearised_at)
    if result.calibration is not None:
        meta["out_of_fold"] = {"folds": result.folds, "srocc": result.oof_srocc}
        meta["calibration"] = result.calibration.to_json()
    path = child_path(out, sup.user, ".profile", "user") if multi else out
    profile = Profile(result.alpha, meta)
    profile.save(path)
    return profile


def profile_summary(profile: Profile) -> dict[str, Any]:
    """What ``inspect`` shows, as plain data."""
    m = profile.meta
    return {
        "name": profile.name,
        "bank": m["bank"],
        "tasks": [{"name": t, "mean_alpha": float(profile.alpha[i].mean()), "min_alpha": float(profile.alpha[i].min()),
                   "max_alpha": float(profile.alpha[i].max()), "init_alpha": m["init"]["alpha_per_task"][i],
                   "zero_shot_srocc": m["zero_shot_srocc"][t]} for i, t in enumerate(m["tasks"])],
        "support_srocc_before": m["support_srocc_before"],
        "support_srocc_after": m["support_srocc_after"],
        "config": m["config"],
        "start_temperature": m["init"]["temperature"],
        "ratings": m["ratings"],
        "loss_curve": {k: v for k, v in m["loss_curve"].items() if k != "values"},
        "linearised_at": m.get("linearised_at"),
        "out_of_fold": m.get("out_of_fold"),
        "calibration": m.get("calibration"),
    }


def plot_coefficients(profile: Profile, out: str | os.PathLike, layer_names: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = profile.alpha.numpy()
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * len(a)))
    im = ax.imshow(a, aspect="auto", cmap="coolwarm", vmin=min(a.min(), -abs(a).max()), vmax=abs(a).max())
    ax.set_yticks(range(len(a)), profile.meta["tasks"])
    ax.set_xlabel("layer (parameter tensor, in model order)")
    ax.set_title(f"coefficients α of profile {profile.name!r}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
