"""Activation memory of mim's MAE against the reference MAE, on the CPU: the bytes autograd saves for backward.

Issue 13 ("memory <= the official model"): on an H200, in the same bf16 loop, mim's MAE peaked 13 % (ViT-B/16) and
25 % (ViT-L/16) above the official model. This script finds which activations hold the difference, deterministically
and without a GPU: one forward pass under ``torch.autocast("cpu", dtype=torch.bfloat16)`` of

- mim's ``PretrainModule`` (built as benchmarks/gpu_mfu.py builds its mim side: ``Arch.build_mim``, norm-pix, mask
  0.75, decoder 8 x 512), ``module.compute_losses(batch, module.draw_masks(...))``;
- benchmarks/gpu_mfu.py's ``ReferenceMAE`` (plain PyTorch from the paper), same sizes, same mask ratio,

inside ``torch.autograd.graph.saved_tensors_hooks``. Every tensor packed for backward is recorded with its dtype,
shape, bytes, the module that was running (a stack kept by forward pre-/post-hooks on every submodule) and the torch
function that saved it (a ``TorchFunctionMode``). Parameters and buffers are left out (by storage pointer). Bytes are
counted twice: **raw** (the sum of every saved tensor's own bytes) and **dedup** (each storage once, with its full
size, charged to the first tensor that saved it: q, k and v saved by attention are views of one qkv output).

Per image: each model runs at batch B and 2B; the per-image bytes are (S(2B) - S(B)) / B, so batch-independent
saved tensors (autocast's bf16 copies of the weights, saved by every linear) cancel. Their total is printed apart.

``--autocast cuda`` (the default) makes ``layer_norm`` follow CUDA autocast's policy on the CPU: CUDA lists
``layer_norm`` among the ops that autocast to float32 (its input is cast to fp32, its output is fp32), CPU autocast
does not (a bf16 input stays bf16). ``--autocast cpu`` leaves CPU autocast alone.

``--device cuda`` runs the same count under CUDA's own autocast and SDPA kernels, and adds the memory per image live
after the forward and at the peak of forward + backward (``torch.cuda.max_memory_allocated``).

``--peak-batch N`` adds the peak of forward + backward on the CPU at batches N and 2N, by kind (parameters,
activations, ...), from PyTorch's private ``MemTracker`` (torch/distributed/_tools/mem_tracker.py), which follows
every storage; pick N large enough that the activations, not the gradients, make the peak (ViT-B: 8).

``--try-fixes`` adds a mim column with the fix proposed in BENCHMARKS.md monkeypatched in (nothing under mim/ is
edited): see :func:`apply_fixes`. ``--arch tiny`` (width 64, 2 blocks, 32 px) runs in seconds (the tests use it).

    .venv/bin/python benchmarks/activation_memory.py --arch vit_b16 --batch 1                 # about 40 s
    .venv/bin/python benchmarks/activation_memory.py --arch vit_l16 --batch 1 --try-fixes     # about 90 s
    .venv/bin/python benchmarks/activation_memory.py --arch vit_b16 --try-fixes --peak-batch 8
    .venv/bin/python benchmarks/activation_memory.py --arch vit_b16 --batch 8 --try-fixes --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_mfu import Arch, ReferenceMAE, synthetic_images  # noqa: E402  (a sibling script, not a package)

from mim.module import PretrainModule  # noqa: E402

ARCHS = {
    "vit_b16": Arch("vit_b16", "vit_base_patch16_224", 224, 16),
    "vit_l16": Arch("vit_l16", "vit_large_patch16_224", 224, 16),
    "tiny": Arch("tiny", "vit_base_patch16_224", 32, 8, {"embed_dim": 64, "depth": 2, "num_heads": 2}, (32, 1, 2)),
}
MIB = 2**20


# ------------------------------------------------------------------------------------------ recording
@dataclass(frozen=True)
class Saved:
    """One tensor packed for backward."""

    path: str  # module path of the innermost running module ("" = the model's own forward)
    op: str  # the torch function that saved it
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int  # the tensor's own bytes (numel x element size)
    storage: tuple[int, int]  # (storage pointer, storage bytes): the dedup key
    first: bool  # the first saved tensor of its storage (carries the storage's bytes in dedup)


class _OpName(TorchFunctionMode):
    """Keeps the name of the running torch function (outermost) in ``self.current``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        previous, self.current = self.current, getattr(func, "__name__", str(func))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current = previous


@contextmanager
def record_saved(model: nn.Module) -> Iterator[list[Saved]]:
    """Record every non-parameter tensor autograd saves while the block runs, with its module path and op."""
    constants = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    stack: list[str] = [""]
    seen: set[tuple[int, int]] = set()
    records: list[Saved] = []
    alive: list[Tensor] = []  # held while recording: a freed storage's address is never taken for a saved one
    ops = _OpName()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in constants:
            return t
        alive.append(t)
        key = (storage.data_ptr(), storage.nbytes())
        records.append(
            Saved(stack[-1], ops.current, t.dtype, tuple(t.shape), t.numel() * t.element_size(), key, key not in seen)
        )
        seen.add(key)
        return t

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    handles = []
    for name, sub in model.named_modules():
        if name:
            handles.append(sub.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
            handles.append(sub.register_forward_hook(leave, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ops:
            yield records
    finally:
        for h in handles:
            h.remove()
        alive.clear()


# ------------------------------------------------------------------------------------------ parts
_MIM_PREFIXES = (("encoder.vit.", ""), ("targets.0.decoder.", ""), ("encoder", "<encoder>"), ("targets.0", "<target>"))


def part_of(path: str, op: str) -> str:
    """The row of the side-by-side table for a module path (mim's or the reference's) and op."""
    for old, new in _MIM_PREFIXES:
        if path.startswith(old):
            path = new + path.removeprefix(old)
            break
    if path.startswith("patch_embed"):
        return "patch embed"
    m = re.match(r"(decoder_)?blocks(?:\.\d+)?\.?(.*)", path)
    if m:
        where = "dec" if m.group(1) else "enc"
        sub = m.group(2).split(".")[0]
        kind = {"attn": "attention", "mlp": "MLP", "norm1": "norms", "norm2": "norms"}.get(sub, "residual")
        return f"{where} blocks: {kind}"
    if path == "norm":
        return "enc final norm"
    if path == "decoder_embed":
        return "decoder embed"
    if path in ("decoder_norm", "decoder_pred"):
        return "decoder norm + pred"
    return f"outside modules: {op}"


@dataclass
class Tally:
    """Saved bytes per image by table row, and their batch-independent part."""

    raw: dict[str, float]
    dedup: dict[str, float]
    detail: dict[tuple[str, str, str, str], float]  # (part, op, dtype, shape per image) -> dedup bytes per image
    constant_raw: float
    constant_dedup: float


def _sums(records: list[Saved]) -> tuple[dict[str, int], dict[str, int], dict[tuple[str, str, str, str], int]]:
    raw: dict[str, int] = defaultdict(int)
    dedup: dict[str, int] = defaultdict(int)
    detail: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for r in records:
        part = part_of(r.path, r.op)
        raw[part] += r.nbytes
        if r.first:
            dedup[part] += r.storage[1]
            shape = "x".join(str(s) for s in r.shape[1:]) if r.shape else "()"
            detail[(part, r.op, str(r.dtype).removeprefix("torch."), shape)] += r.storage[1]
    return raw, dedup, detail


def tally(run: Callable[[int], list[Saved]], batch: int) -> Tally:
    """Per-image saved bytes from runs at ``batch`` and ``2 * batch`` (the difference over ``batch``)."""
    small, large = _sums(run(batch)), _sums(run(2 * batch))
    per = [{k: (large[i].get(k, 0) - small[i].get(k, 0)) / batch for k in {*small[i], *large[i]}} for i in range(3)]
    const = [sum(small[i].values()) - batch * sum(per[i].values()) for i in range(2)]
    return Tally(per[0], per[1], per[2], const[0], const[1])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ the two models
def mim_loss(module: PretrainModule, arch: Arch, device: torch.device, seed: int) -> Callable[[int], Tensor]:
    """``loss(batch)``: mim's ``compute_losses`` under bf16 autocast, masks from ``module.draw_masks``."""

    def loss(batch: int) -> Tensor:
        images = synthetic_images(batch, arch.img_size, device, 1, seed)[0]  # (B, 3, H, W)
        masks = module.draw_masks({"image": images}, torch.Generator(device=device).manual_seed(seed), images)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return module.compute_losses({"image": images}, masks)["loss"]

    return loss


def reference_loss(ref: ReferenceMAE, arch: Arch, device: torch.device, seed: int) -> Callable[[int], Tensor]:
    """``loss(batch)``: the reference MAE under bf16 autocast, masking noise from a seeded generator."""

    def loss(batch: int) -> Tensor:
        images = synthetic_images(batch, arch.img_size, device, 1, seed)[0]  # (B, 3, H, W)
        gen = torch.Generator(device=device).manual_seed(seed)
        noise = torch.rand(batch, ref.num_patches, generator=gen, device=device)  # (B, N)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return ref(images, noise)

    return loss


def recorded(model: nn.Module, loss: Callable[[int], Tensor]) -> Callable[[int], list[Saved]]:
    """``run(batch)``: the saved tensors of one forward pass of ``loss``."""

    def run(batch: int) -> list[Saved]:
        with record_saved(model) as records:
            out = loss(batch)
        assert out.grad_fn is not None
        return records

    return run


def cuda_peak(model: nn.Module, loss: Callable[[int], Tensor], batch: int) -> tuple[float, float]:
    """(live after the forward, peak over forward + backward), bytes per image above the step's start, on CUDA.

    Per image as :func:`tally`: from ``batch`` and ``2 * batch``. Gradients are set to None before each step.
    """

    def step(b: int) -> tuple[int, int]:
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = loss(b)
        after = torch.cuda.memory_allocated() - base
        out.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
        return after, peak

    step(batch)  # warm-up: lazy initialisations, cuBLAS workspaces
    (a1, p1), (a2, p2) = step(batch), step(2 * batch)
    return (a2 - a1) / batch, (p2 - p1) / batch


def tracked_peak(model: nn.Module, loss: Callable[[int], Tensor], batch: int) -> dict[str, float]:
    """Peak memory of forward + backward on the CPU, by kind, from ``torch.distributed._tools.mem_tracker.MemTracker``
    (a private PyTorch tool that follows every storage through a dispatch mode; parameters, gradients, activations,
    temporaries). Bytes at the peak, and the peak per image from ``batch`` and ``2 * batch`` (``per image``)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHandle:
        def remove(self) -> None:
            pass

    hooks = torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook

    def guarded(hook: Callable) -> Callable:  # MemTracker hooks every parameter; frozen ones refuse hooks
        return lambda t, fn: hook(t, fn) if t.requires_grad else _NoHandle()

    def peak(b: int) -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        with tracker:
            loss(b).backward()
        model.zero_grad(set_to_none=True)
        snapshot = tracker.get_tracker_snapshot("peak")
        return {str(getattr(k, "value", k)): float(v) for d in snapshot.values() for k, v in d.items()}

    torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = map(guarded, hooks)  # type: ignore[method-assign, assignment]
    try:
        small, large = peak(batch), peak(2 * batch)
    finally:
        torch.Tensor.register_hook, torch.Tensor.register_post_accumulate_grad_hook = hooks  # type: ignore[method-assign]
    in_backward = small.get("Gradient", 0.0) > 0 or large.get("Gradient", 0.0) > 0  # the two peaks differ in kind
    return {**large, "per image": float("nan") if in_backward else (large["Total"] - small["Total"]) / batch}


# ------------------------------------------------------------------------------------------ autocast policy, fixes
@contextmanager
def cuda_layer_norm() -> Iterator[None]:
    """``F.layer_norm`` as CUDA autocast runs it: input, weight and bias cast to float32, output float32."""
    original = F.layer_norm

    def layer_norm(x: Tensor, shape, weight=None, bias=None, eps=1e-5):  # noqa: ANN001
        if not torch.is_autocast_enabled("cpu"):
            return original(x, shape, weight, bias, eps)
        with torch.autocast("cpu", enabled=False):
            w = None if weight is None else weight.float()
            b = None if bias is None else bias.float()
            return original(x.float(), shape, w, b, eps)

    F.layer_norm = layer_norm  # type: ignore[assignment]
    try:
        yield
    finally:
        F.layer_norm = original  # type: ignore[assignment]


def gather_tokens_index_select(x: Tensor, index: Tensor) -> Tensor:
    """``mim.tokens.gather_tokens`` without saving ``x``: (B, N, D), (B, K) -> (B, K, D).

    ``torch.gather``'s backward formula keeps its whole input (derivatives.yaml: ``gather_backward(grad, self, ...)``,
    only for its shape); ``index_select``'s keeps the sizes and the index. Same values, same gradients.
    """
    b, n, d = x.shape
    flat = (index + torch.arange(b, device=index.device).unsqueeze(1) * n).flatten()  # (B*K,) rows of (B*N, D)
    return x.reshape(b * n, d).index_select(0, flat).view(b, index.shape[1], d)  # (B, K, D)


@contextmanager
def apply_fixes() -> Iterator[None]:
    """The fix proposed for mim, monkeypatched into the modules that imported it (nothing under mim/ is edited).

    ``gather_tokens`` (mim/tokens.py): ``index_select`` on the flattened (B*N, D) tokens instead of ``torch.gather``,
    which saves its whole (B, N, D) input for backward: the fp32 patch tokens in ``MaskedEncoder.forward`` and the
    decoder output in ``MAEDecoder.decode``. Values and gradients are unchanged (each token is picked at most once).
    """
    import mim.models.decoder
    import mim.models.encoder
    import mim.targets.pixels

    modules = (mim.models.encoder, mim.models.decoder, mim.targets.pixels)
    gathers = [m.gather_tokens for m in modules]
    for m in modules:
        m.gather_tokens = gather_tokens_index_select  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, g in zip(modules, gathers):
            m.gather_tokens = g  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ tables
def _mib(v: float) -> str:
    return f"{v / MIB:.2f}"


def table(columns: dict[str, Tally], kind: str) -> str:
    """Markdown: one row per part, MiB per image, then the difference of each later column from the first."""
    names = list(columns)
    rows = sorted({p for t in columns.values() for p in getattr(t, kind)}, key=_order)
    head = [f"{n} MiB/img" for n in names] + [f"{n} - {names[0]}" for n in names[1:]]
    lines = ["| part | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    totals = {n: 0.0 for n in names}
    for part in rows:
        vals = {n: getattr(columns[n], kind).get(part, 0.0) for n in names}
        for n in names:
            totals[n] += vals[n]
        if all(abs(v) < 0.005 * MIB for v in vals.values()):  # rounds to 0.00 everywhere
            continue
        cells = [_mib(vals[n]) for n in names] + [f"{(vals[n] - vals[names[0]]) / MIB:+.2f}" for n in names[1:]]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    cells = [f"**{_mib(totals[n])}**" for n in names]
    cells += [
        f"**{(totals[n] - totals[names[0]]) / MIB:+.2f} ({totals[n] / totals[names[0]] - 1:+.1%})**" for n in names[1:]
    ]
    lines.append("| **total** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _order(part: str) -> tuple[int, str]:
    order = ("patch embed", "enc blocks", "enc final", "decoder embed", "dec blocks", "decoder norm", "outside")
    return next((i for i, p in enumerate(order) if part.startswith(p)), len(order)), part


def detail(columns: dict[str, Tally], top: int) -> str:
    """The (part, op, dtype, shape) groups whose dedup bytes per image differ most between the first two columns."""
    a, b = list(columns.values())[:2]
    keys = {*a.detail, *b.detail}
    diffs = sorted(keys, key=lambda k: -abs(b.detail.get(k, 0) - a.detail.get(k, 0)))[:top]
    names = list(columns)[:2]
    lines = [
        f"| part | op | dtype | shape/img | {names[0]} MiB | {names[1]} MiB | diff |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for k in diffs:
        va, vb = a.detail.get(k, 0), b.detail.get(k, 0)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {_mib(va)} | {_mib(vb)} | {(vb - va) / MIB:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit_b16")
    parser.add_argument("--batch", type=int, default=1, help="images in the small run (the large one has twice)")
    parser.add_argument("--autocast", choices=("cuda", "cpu"), default="cuda", help="layer_norm's autocast policy")
    parser.add_argument("--try-fixes", action="store_true", help="add a column with the proposed fixes patched in")
    parser.add_argument("--detail", type=int, default=12, help="rows of the reference-vs-mim detail table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-batch", type=int, default=0, help="also track the fwd+bwd peak at this batch and 2x")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (saved bytes and peak memory on a GPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    device, arch = torch.device(args.device), ARCHS[args.arch]
    emulate = args.autocast == "cuda" and device.type == "cpu"
    with torch.device(device):
        module = arch.build_mim(args.seed).train()
        ref = arch.build_reference(module).train()
    losses = {"reference": (ref, reference_loss(ref, arch, device, args.seed))}
    losses["mim"] = (module, mim_loss(module, arch, device, args.seed))
    columns: dict[str, Tally] = {}
    peaks: dict[str, tuple[float, float]] = {}
    cpu_peaks: dict[str, dict[str, float]] = {}
    for name in ("reference", "mim", "mim fixed") if args.try_fixes else ("reference", "mim"):
        model, loss = losses[name.removesuffix(" fixed")]
        with ExitStack() as stack:
            if emulate:
                stack.enter_context(cuda_layer_norm())
            if name.endswith("fixed"):
                stack.enter_context(apply_fixes())
            columns[name] = tally(recorded(model, loss), args.batch)
            if device.type == "cuda":
                peaks[name] = cuda_peak(model, loss, args.batch)
            if args.peak_batch:
                cpu_peaks[name] = tracked_peak(model, loss, args.peak_batch)
    policy = "CUDA's" if device.type == "cuda" else ("CUDA's, emulated" if emulate else "CPU's")
    print(
        f"saved-for-backward bytes per image, {arch.key} {arch.img_size} px, mask 0.75, decoder {arch.dec}, "
        f"bf16 autocast on {device.type} (layer_norm: {policy}), batches {args.batch} and {2 * args.batch}, "
        f"torch {torch.__version__}\n"
    )
    print("### Deduplicated (each storage once)\n\n" + table(columns, "dedup") + "\n")
    print("### Raw (every saved tensor)\n\n" + table(columns, "raw") + "\n")
    consts = ", ".join(f"{n} {_mib(t.constant_dedup)} MiB" for n, t in columns.items())
    print(f"Batch-independent saved bytes (bf16 weight copies; dedup): {consts}\n")
    print(f"### Largest differences, {' vs '.join(list(columns)[:2])} (dedup)\n\n" + detail(columns, args.detail))
    if args.try_fixes:
        print(f"\n### Largest differences, mim vs mim fixed (dedup)\n\n{detail(dict(list(columns.items())[1:]), 8)}")
    if peaks:
        lines = ["| model | live after forward MiB/img | peak fwd+bwd MiB/img |", "|---|---:|---:|"]
        lines += [f"| {n} | {_mib(a)} | {_mib(p)} |" for n, (a, p) in peaks.items()]
        print("\n### CUDA memory per image (torch.cuda.max_memory_allocated)\n\n" + "\n".join(lines))
    if cpu_peaks:
        kinds = [k for k in next(iter(cpu_peaks.values())) if k not in ("Total", "per image")]
        head = f"| model | peak MiB (batch {2 * args.peak_batch}) | " + " | ".join(f"{k} MiB" for k in kinds)
        lines = [head + " | peak per image MiB |", "|---|" + "---:|" * (len(kinds) + 2)]
        for n, d in cpu_peaks.items():
            cells = " | ".join(_mib(d.get(k, 0.0)) for k in kinds)
            per = "- (a peak in the backward)" if d["per image"] != d["per image"] else _mib(d["per image"])
            lines.append(f"| {n} | {_mib(d['Total'])} | {cells} | {per} |")
        print("\n### Peak of forward + backward on the CPU (MemTracker), at the peak\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
