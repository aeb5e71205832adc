"""The task-vector bank: θ_pre plus n task vectors τ_i = θ_ft_i − θ_pre, one per parameter tensor (eq. 1).

On disk a bank is a folder with ``weights.safetensors`` (``pre.<layer>`` in float32 and
``tau.<layer>`` stacked over tasks as ``[n, *shape]`` in the storage dtype) and ``manifest.json``.
The manifest's fingerprint covers the weights file and the manifest itself; loading verifies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import LaionfilterError
from .names import check_distinct, check_name
from .formats import BANK_FORMAT, TASK_FORMAT, validate
from .model import SCALES, Architecture, BaseSpec, ScoreModel, build_architecture, layer_names, load_base, load_state, model_state
from .safefiles import (StoredTensors, file_sha256, read_json, read_metadata, read_safetensors,
                        read_safetensors_shapes, state_fingerprint, write_json, write_safetensors)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fingerprint(weights: Path, manifest: dict[str, Any]) -> str:
    h = file_sha256(weights)
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Bank:
    path: Path
    manifest: dict[str, Any]
    pre: Mapping[str, torch.Tensor]  # layer → θ_pre (float32), read from the file when indexed
    tau: Mapping[str, torch.Tensor]  # layer → [n, *shape] task vectors (storage dtype), likewise

    @property
    def parameters(self) -> int:
        """Parameters per model (from the manifest; nothing is read)."""
        return sum(int(np.prod(shape)) for shape in self.manifest["shapes"])

    @property
    def layers(self) -> list[str]:
        return self.manifest["layers"]

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.manifest["tasks"]

    @property
    def n(self) -> int:
        return len(self.tasks)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def architecture(self) -> Architecture:
        return Architecture.from_json(self.manifest["architecture"])

    def new_model(self, template: tuple[float, ...] | None = None, empty: bool = False) -> ScoreModel:
        """An empty model of the bank's architecture (weights to be filled).

        Merged models dot with 1..10: a task's own template (0.5..5 for 1–5 databases) is 1..10 halved,
        so it rescales that task's scores without changing any ranking; ``task_model`` uses it.
        """
        arch = self.architecture
        _, model = build_architecture(arch.name, arch.head, arch.model_config, arch.preprocess, empty=empty)
        if template is not None or empty:  # an empty model's buffers are on the meta device too
            model.template = torch.tensor(template or SCALES["1-10"], dtype=torch.float32)
        return model

    def merged_state(self, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ_pre^l + Σ_i α_i^l τ_i^l for every layer (eq. 2); ``alpha`` is n × L, or n for one per task."""
        from .merge import merge_weights

        return merge_weights(self.pre, self.tau, self.layers, alpha)

    def task_state(self, i: int) -> dict[str, torch.Tensor]:
        """θ_pre + τ_i: task i's fine-tuned weights."""
        alpha = torch.zeros(self.n)
        alpha[i] = 1
        return self.merged_state(alpha)

    def model(self, state: dict[str, torch.Tensor], template: tuple[float, ...] | None = None) -> ScoreModel:
        """A model holding ``state`` itself: built empty and assigned, so the weights exist once."""
        m = self.new_model(template, empty=True)
        load_state(m, state, self.path, assign=True)
        return m.eval()

    def task_model(self, i: int) -> ScoreModel:
        """Task i's fine-tuned model, scoring on its database's own scale."""
        return self.model(self.task_state(i), tuple(self.tasks[i]["template"]))

    def base_model(self) -> ScoreModel:
        return self.model(dict(self.pre))  # read from the file: its own weights

    def similarity(self) -> np.ndarray:
        """Cosine similarity of the flattened task vectors (the paper's Fig. 4)."""
        n = self.n
        gram = torch.zeros(n, n, dtype=torch.float64)
        for t in self.tau.values():
            flat = t.reshape(n, -1).double()
            gram += flat @ flat.T
        norms = gram.diagonal().sqrt().clamp_min(1e-30)
        return (gram / norms[:, None] / norms[None, :]).numpy()


def load_bank(path: str | os.PathLike, verify: bool = True) -> Bank:
    path = Path(path)
    if not path.is_dir():
        raise LaionfilterError(f"{path}: no such bank folder")
    manifest = validate(read_json(path / "manifest.json", what="bank manifest"), BANK_FORMAT, path / "manifest.json")
    weights = path / "weights.safetensors"
    shapes, _ = read_safetensors_shapes(weights, what="bank weights")
    if verify and _fingerprint(weights, manifest) != manifest.get("fingerprint"):
        raise LaionfilterError(f"{path}: content does not match the manifest's fingerprint (modified or corrupt)")
    for t in manifest["tasks"]:
        check_name(t.get("name"), "task name", path / "manifest.json")
    n = len(manifest["tasks"])
    for layer, shape in zip(manifest["layers"], manifest["shapes"]):
        for key, want in ((f"pre.{layer}", tuple(shape)), (f"tau.{layer}", (n, *shape))):
            if key not in shapes:
                raise LaionfilterError(f"{weights}: tensor {key} is missing")
            if shapes[key] != want:
                raise LaionfilterError(f"{weights}: tensor {key} has shape {shapes[key]}, expected {want}")
    # Read layer by layer when used: building a merged model then holds that model and one layer of
    # the bank, not θ_pre and every τ besides (benchmarks/score.py measures the peak).
    layers = manifest["layers"]
    return Bank(path, manifest, StoredTensors(weights, layers, "pre.", "bank weights"),
                StoredTensors(weights, layers, "tau.", "bank weights"))


SHIPPED = Path(__file__).parent / "data" / "starter-bank"


def default_cache() -> Path:
    root = os.environ.get("LAIONFILTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "laionfilter")
    return Path(root)


def _starter_path() -> Path | None:
    """Where ``starter`` points: ``$LAIONFILTER_BANK``, else the bank shipped in the package, else the cache."""
    env = os.environ.get("LAIONFILTER_BANK")
    if env and env != "starter":
        return Path(env)
    if (SHIPPED / "manifest.json").exists():
        return SHIPPED
    cache = default_cache() / "starter-bank"
    return cache if (cache / "manifest.json").exists() else None


def resolve_bank(spec: str | os.PathLike | None = "starter") -> Bank:
    """A bank from a folder, or ``starter``: ``$LAIONFILTER_BANK`` if set, else the bank shipped in the
    package (4 MiB, fp16), else one built earlier into the cache (``bank starter --out``)."""
    spec = str(spec) if spec is not None else "starter"
    if spec != "starter":
        return load_bank(spec)
    path = _starter_path()
    if path is None:
        raise LaionfilterError(f"this installation has no starter bank ({SHIPPED} is missing); build one with "
                               f"`laionfilter bank starter --out {default_cache() / 'starter-bank'}`")
    return load_bank(path)


def _manifest_fingerprint(folder: Path) -> str | None:
    try:
        manifest = read_json(folder / "manifest.json", what="bank manifest")
    except LaionfilterError:  # not a bank (any more): the caller tries the next place
        return None
    return manifest.get("fingerprint") if isinstance(manifest, dict) else None


def find_bank(want: dict[str, Any], source: str | os.PathLike, bank: str | os.PathLike | None = None) -> Bank:
    """The bank a profile was learned on, found by its fingerprint, not by where it lay at learn time.

    ``want`` is the profile's ``bank`` record (fingerprint, path, tasks). An explicit ``bank`` must match
    it; otherwise the recorded path is tried, then the starter bank wherever this package is installed.
    """
    fingerprint = want["fingerprint"]
    tasks = ", ".join(want.get("tasks") or []) or "tasks not recorded"
    hint = f"it wants bank {fingerprint[:16]} ({tasks}; learned on {want.get('path')})"
    if bank is not None:
        found = resolve_bank(bank)
        if found.fingerprint != fingerprint:
            raise LaionfilterError(f"{source}: {hint}, not {found.path} ({found.fingerprint[:16]}); "
                                   "pass --bank with the bank it was learned on")
        return found
    recorded = Path(want["path"]) if want.get("path") else None
    candidates = [c for c in (recorded, _starter_path()) if c is not None]
    for c in candidates:
        if _manifest_fingerprint(c) == fingerprint:
            return load_bank(c)
    raise LaionfilterError(f"{source}: {hint}; it is not at {recorded} (moved?) and is not the starter bank: "
                           "pass --bank FOLDER with that bank")


def _read_task(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = read_safetensors(path, what="task checkpoint")
    return tensors, validate(meta, TASK_FORMAT, path)


def build_bank(tasks: list[str | os.PathLike], out: str | os.PathLike, base: str | None = None,
               dtype: str = "float16") -> Bank:
    """Pack task checkpoints fine-tuned from one base into a bank; refuses tasks from another base."""
    if not tasks:
        raise LaionfilterError("bank build needs at least one task checkpoint")
    if dtype not in DTYPES:
        raise LaionfilterError(f"--dtype must be one of {', '.join(DTYPES)}")
    paths = [Path(t) for t in tasks]
    metas = [validate(read_metadata(p, what="task checkpoint"), TASK_FORMAT, p) for p in paths]
    first = metas[0]
    for p, m in zip(paths[1:], metas[1:]):
        if m["base"]["fingerprint"] != first["base"]["fingerprint"] or m["architecture"] != first["architecture"]:
            raise LaionfilterError(
                f"{p}: fine-tuned from another base ({m['base']['spec']}, fingerprint {m['base']['fingerprint'][:12]}) "
                f"than {paths[0]} ({first['base']['spec']}, {first['base']['fingerprint'][:12]}); "
                "task vectors only combine when every task starts from the same θ_pre"
            )
    names = [check_name(m.get("name"), "task name", p) for p, m in zip(paths, metas)]
    check_distinct(names, "task names (give each task a distinct --name when fine-tuning)")
    arch = Architecture.from_json(first["architecture"])
    _, base_model = load_base(base or first["base"]["spec"], arch.head)
    pre = model_state(base_model)
    if state_fingerprint(pre) != first["base"]["fingerprint"]:
        raise LaionfilterError(
            f"the base {base or first['base']['spec']!r} does not reproduce the weights the tasks were fine-tuned "
            f"from (fingerprint {state_fingerprint(pre)[:12]} vs {first['base']['fingerprint'][:12]}); pass --base"
        )
    layers = layer_names(base_model)
    taus: dict[str, list[torch.Tensor]] = {l: [] for l in layers}
    for p in paths:
        ft, meta = _read_task(p)
        if meta["layers"] != layers:
            raise LaionfilterError(f"{p}: its layer list differs from the base's")
        for l in layers:
            if l not in ft:
                raise LaionfilterError(f"{p}: tensor {l} is missing")
            if ft[l].shape != pre[l].shape:
                raise LaionfilterError(f"{p}: tensor {l} has shape {tuple(ft[l].shape)}, the base has {tuple(pre[l].shape)}")
            taus[l].append(ft[l].float() - pre[l])
    tasks_meta = [{"name": m["name"], "database": m["database"], "scale": m["scale"], "template": m["template"],
                   "metrics": m["metrics"], "source": str(p), "source_sha256": file_sha256(p).hexdigest()}
                  for p, m in zip(paths, metas)]
    return write_bank(out, arch, first["base"], layers, pre, {l: torch.stack(taus[l]).to(DTYPES[dtype]) for l in layers},
                      dtype, tasks_meta)


def write_bank(out: str | os.PathLike, arch: Architecture, base: dict[str, Any], layers: list[str],
               pre: dict[str, torch.Tensor], tau: dict[str, torch.Tensor], dtype: str, tasks: list[dict[str, Any]],
               extra: dict[str, Any] | None = None) -> Bank:
    """Write ``weights.safetensors`` and the fingerprinted ``manifest.json``; returns the bank, loaded back."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"pre.{l}": pre[l] for l in layers}
    tensors.update({f"tau.{l}": tau[l] for l in layers})
    weights = write_safetensors(out / "weights.safetensors", tensors, {"format": BANK_FORMAT})
    manifest = {
        "format": BANK_FORMAT,
        "laionfilter_version": __version__,
        "architecture": arch.to_json(),
        "base": base,
        "layers": layers,
        "shapes": [list(pre[l].shape) for l in layers],
        "dtype": dtype,
        "tasks": tasks,
        **(extra or {}),
    }
    manifest["fingerprint"] = _fingerprint(weights, manifest)
    write_json(out / "manifest.json", manifest)
    return load_bank(out)


def base_label(spec: str) -> str:
    """A base as it means something on any machine: a checkpoint by its file name, not the builder's folder."""
    parsed = BaseSpec.parse(spec)
    return f"{parsed.arch}:{Path(parsed.checkpoint).name}" if parsed.checkpoint else str(parsed)


def bank_info(bank: Bank) -> dict[str, Any]:
    """What ``bank info`` shows, as plain data."""
    weights = bank.path / "weights.safetensors"
    params = bank.parameters
    return {
        "path": str(bank.path),
        "fingerprint": bank.fingerprint,
        "architecture": bank.manifest["architecture"]["name"],
        "base": base_label(bank.manifest["base"]["spec"]),
        "base_fingerprint": bank.manifest["base"]["fingerprint"],
        "n": bank.n,
        "L": len(bank.layers),
        "parameters_per_model": params,
        "dtype": bank.manifest["dtype"],
        "size_bytes": weights.stat().st_size,
        "tasks": [{"name": t["name"], "scale": t["scale"], "database": t["database"],
                   "source": Path(t.get("source", "")).name, "source_sha256": t["source_sha256"],
                   **{k: t["metrics"].get(k) for k in ("val_srocc", "val_plcc", "n_val")}}
                  for t in bank.tasks],
        "imported": bank.manifest.get("imported"),
        "similarity": [[round(float(v), 4) for v in row] for row in bank.similarity()],
    }


def plot_similarity(info: dict[str, Any], out: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["name"] for t in info["tasks"]]
    sim = np.array(info["similarity"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(names), 0.8 + 0.8 * len(names)))
    im = ax.imshow(sim, cmap="viridis", vmin=min(0.0, sim.min()), vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", color="w" if sim[i, j] < 0.6 else "k", fontsize=8)
    ax.set_title("cosine similarity of task vectors")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
