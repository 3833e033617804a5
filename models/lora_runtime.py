"""LoRAs applied as side branches of nn.Linear layers, whatever the model family.

A family converts a LoRA file into the canonical form below ({module name: ModuleDelta}); this
module attaches it to a model with forward hooks: out = base(x) + strength_t * branch(x). The base
weights are never modified, so the same code works on optimum-quanto int8 `QLinear` layers (and
later under mmgp), per-step strengths cost nothing but a float change, and removing a LoRA (a hook
removal) restores the base output bit for bit.

`LoraManager.sync(selection)` makes the model carry exactly the selected files with the selected
strengths; it re-reads nothing and re-hooks nothing when only the strengths (or nothing) changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.errors import UserError
from models.parsing import MAX_LORA_STRENGTH, Strength, parse_schedule  # noqa: F401  (re-exported)

log = logging.getLogger("wgp_zimage")


# ------------------------------------------------------------------------------ canonical form

@dataclass
class ModuleDelta:
    """The weight change a LoRA makes to one Linear; components add up.

    dW = scale * up @ down  +  scale * kron(kron[0], kron[1])  +  dense;  d_bias = bias.
    DoRA (`magnitude`): W' = m * (W + dW) / ||W + dW||, the norm taken per output row
    (magnitude_axis 0: peft, LyCORIS wd_on_out) or per input column (axis 1: old LyCORIS).
    """

    up: torch.Tensor | None = None  # (out, r)
    down: torch.Tensor | None = None  # (r, in)
    kron: tuple[torch.Tensor, torch.Tensor] | None = None  # (a1, a2), (b1, b2): out = a1*b1, in = a2*b2
    scale: float = 1.0  # applies to up@down and kron
    dense: torch.Tensor | None = None  # (out, in), already scaled (diff, LoHa)
    bias: torch.Tensor | None = None  # (out,)
    magnitude: torch.Tensor | None = None  # DoRA m, flattened: (out,) or (in,)
    magnitude_axis: int = 0
    keys: tuple[str, ...] = ()  # the file's tensors this delta comes from (for the report)

    def shape(self) -> tuple[int, int] | None:
        """(out, in) implied by the factors, None when only a bias is given."""
        if self.up is not None:
            return (self.up.shape[0], self.down.shape[1])
        if self.kron is not None:
            a, b = self.kron
            return (a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])
        if self.dense is not None:
            return tuple(self.dense.shape)
        return None


def low_rank_delta(md: ModuleDelta) -> torch.Tensor | None:
    """dW (float32) without DoRA; None when the delta touches only the bias."""
    parts = []
    if md.up is not None:
        parts.append(md.scale * (md.up.float() @ md.down.float()))
    if md.kron is not None:
        parts.append(md.scale * torch.kron(md.kron[0].float(), md.kron[1].float()))
    if md.dense is not None:
        parts.append(md.dense.float())
    return sum(parts[1:], parts[0]) if parts else None


def dora_gain(md: ModuleDelta, weight: torch.Tensor) -> torch.Tensor:
    """m / ||W + dW|| (float32), per output row or per input column."""
    total = weight.float() + low_rank_delta(md)
    norm = total.norm(dim=1 - md.magnitude_axis)
    return md.magnitude.float() / norm.clamp_min(torch.finfo(torch.float32).tiny)


def dense_delta(md: ModuleDelta, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The full-strength weight change W' - W (float32); DoRA needs the base weight."""
    dw = low_rank_delta(md)
    if md.magnitude is None:
        return dw
    if weight is None:
        raise ValueError("a DoRA delta depends on the base weight")
    g = dora_gain(md, weight)
    total = weight.float() + dw
    scaled = total * (g[:, None] if md.magnitude_axis == 0 else g[None, :])
    return scaled - weight.float()


def base_weight(module: nn.Linear) -> torch.Tensor:
    """The Linear's weight as a plain float32 tensor (dequantized for quanto and low-bit layers)."""
    if hasattr(module, "dequantized_weight"):  # models.lowbit layers: no `weight` attribute
        return module.dequantized_weight(torch.float32).detach()
    w = module.weight
    if hasattr(w, "dequantize"):
        w = w.dequantize()
    return w.detach().float()


@dataclass
class ConvertedLora:
    """A family converter's result: deltas by module name and the keys it could not place."""

    deltas: dict[str, ModuleDelta]
    unmatched: dict[str, str]  # key -> reason
    total: int  # tensors in the file
    format: str = "unknown"


Converter = Callable[[dict[str, torch.Tensor]], ConvertedLora]


# ------------------------------------------------------------------------------ strengths

def strength_at(schedule: Sequence[float], step: int, steps: int) -> float:
    """Value for step i of n: m values spread evenly, step i takes value floor(i * m / n)."""
    m = len(schedule)
    return schedule[min(m - 1, step * m // max(steps, 1))]


# ------------------------------------------------------------------------------ side branches

class _Branch:
    """One LoRA's contribution to one Linear, its tensors cast to the layer's device and dtype."""

    def __init__(self, md: ModuleDelta, module: nn.Linear, owner: _Active):
        self.owner = owner
        if hasattr(module, "compute_device_dtype"):  # models.lowbit layers: told without dequantizing
            dev, dt = module.compute_device_dtype()
        else:
            dev = module.weight.device
            dt = module.weight.dtype if module.weight.dtype.is_floating_point else torch.float32
        cast = lambda t: None if t is None else t.detach().to(device=dev, dtype=dt).contiguous()
        self.up, self.down, self.scale = cast(md.up), cast(md.down), md.scale
        self.kron = None if md.kron is None else (cast(md.kron[0]), cast(md.kron[1]))
        self.dense, self.bias = cast(md.dense), cast(md.bias)
        self.axis = md.magnitude_axis
        # DoRA's gain depends on the base weight only: computed once, here
        self.gain = None if md.magnitude is None else cast(dora_gain(md, base_weight(module)))
        self._alt: dict[tuple, _Branch] = {}

    def _for(self, x: torch.Tensor) -> _Branch:
        """Copies for another device/dtype (offloaded or autocast layers), made once."""
        ref = next(t for t in (self.down, self.dense, self.bias, self.gain, *(self.kron or ())) if t is not None)
        if ref.device == x.device and ref.dtype == x.dtype:
            return self
        key = (x.device, x.dtype)
        if key not in self._alt:
            alt = object.__new__(_Branch)
            alt.__dict__.update(self.__dict__)
            for name in ("up", "down", "dense", "bias", "gain"):
                t = getattr(self, name)
                setattr(alt, name, None if t is None else t.to(device=x.device, dtype=x.dtype))
            alt.kron = None if self.kron is None else tuple(t.to(device=x.device, dtype=x.dtype) for t in self.kron)
            self._alt[key] = alt
        return self._alt[key]

    def delta_x(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ dW^T at full strength, computed without ever forming dW for low-rank factors."""
        out = None
        if self.up is not None:  # scale on the rank-r intermediate: cheapest place
            out = F.linear(F.linear(x, self.down) * self.scale, self.up)
        if self.kron is not None:  # kron(A, B) x = vec(A X B^T) with X = x viewed as (a2, b2)
            a, b = self.kron
            y = torch.matmul(torch.matmul(a, x.unflatten(-1, (a.shape[1], b.shape[1]))), b.T)
            y = y.flatten(-2) * self.scale
            out = y if out is None else out + y
        if self.dense is not None:
            y = F.linear(x, self.dense)
            out = y if out is None else out + y
        return out

    def add_low_rank(self, x: torch.Tensor, out: torch.Tensor, s: torch.Tensor) -> torch.Tensor | None:
        """out + s * up(down(x)) for a plain low-rank branch, the addition done by the GEMM's epilogue.

        The generic path writes the branch output, scales it and adds it: six passes over a tensor of
        the layer's output size, which made a rank-32 LoRA cost ~19% of a step on an H100; addmm reads
        `out` once and writes once. None where it does not apply (other forms, mixed dtypes).
        """
        if self.up is None or self.kron is not None or self.dense is not None or self.gain is not None \
                or self.bias is not None:
            return None
        br = self._for(x)
        if out.dtype != br.up.dtype or x.dtype != br.down.dtype:
            return None
        h = F.linear(x, br.down).mul_(s)
        if self.scale != 1.0:
            h.mul_(self.scale)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), br.up.t()).view(out.shape)

    def __call__(self, module: nn.Linear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """This branch's addition to base_out (= module(x)) at the owner's current strength s.

        DoRA is applied as W + s * (W' - W): linear in s, the base layer at s = 0, W' at s = 1.
        """
        s = self.owner.tensor
        br = self._for(x)
        out: torch.Tensor | float = 0.0
        if br.gain is None:
            dx = br.delta_x(x)
            if dx is not None:
                out = dx * s
        elif br.axis == 0:  # W' x = g * (W x + dW x); the bias is not rescaled
            b = 0.0 if module.bias is None else module.bias.to(base_out.dtype)
            dx = br.delta_x(x)
            out = s * ((br.gain - 1) * (base_out - b) + br.gain * dx)
        else:  # W' x = (W + dW)(g * x): one more base evaluation, the bias cancels in the difference
            gx = x * br.gain
            out = s * (module.forward(gx) - base_out + br.delta_x(gx))
        if br.bias is not None:
            out = out + s * br.bias
        return out


class _Hook:
    """The forward hook of one Linear: sums the branches of every active LoRA on it."""

    def __init__(self, module: nn.Linear):
        self.branches: list[_Branch] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x, base = args[0], out
        for br in self.branches:
            if not br.owner.on:  # a zero strength costs nothing
                continue
            fast = br.add_low_rank(x, out, br.owner.tensor)
            out = fast if fast is not None else out + br(module, x, base)
        return out


@dataclass
class _Active:
    """One attached LoRA file."""

    key: tuple  # (resolved path, mtime_ns, size)
    report: LoraReport
    schedule: tuple[float, ...]
    current: float = 0.0  # set() keeps it, `tensor` and `on` together
    modules: list[str] = field(default_factory=list)
    # the strength again as a 0-dim tensor changed in place, and whether it is non-zero: compiled blocks
    # treat a float read in a hook as a constant and would recompile for every new strength
    tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    on: bool = False

    def set(self, strength: float) -> None:
        self.current, self.on = strength, strength != 0.0
        self.tensor.fill_(strength)


@dataclass
class LoraReport:
    """What loading one file did, for the log and the UI."""

    name: str
    path: str
    format: str
    applied: int  # tensors of the file in use
    total: int  # tensors in the file
    modules: int  # Linear layers it changes
    unmatched: dict[str, str] = field(default_factory=dict)  # key -> reason

    @property
    def summary(self) -> str:
        text = f"LoRA {self.name} ({self.format}): {self.applied} of {self.total} tensors applied"
        return text + (f", {len(self.unmatched)} unmatched" if self.unmatched else "")


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors on the CPU; a missing or unreadable file is a UserError naming it."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"LoRA file not found: {path.name}")
    try:
        sd = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for any corruption
        raise UserError(f"LoRA file {path.name} is not a readable safetensors file ({e})") from None
    if not sd:
        raise UserError(f"LoRA file {path.name} holds no tensors")
    # a NaN or Inf weight turns every image into NaN pixels that still save as a "done" job: refuse the file
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"LoRA file {path.name} holds NaN or infinite values in {len(bad)} tensor(s): {listed}; "
                        "refused (a broken training run or download?)")
    return sd


class LoraManager:
    """Keeps a model's LoRA side branches in line with the current job's selection."""

    def __init__(self, model: nn.Module, converter: Converter):
        self.model = model
        self.converter = converter
        self._active: dict[tuple, _Active] = {}
        self._hooks: dict[str, _Hook] = {}
        self.loads = 0  # files read and converted (tests: nothing is redone when unchanged)

    # -- public

    def sync(self, selection: Mapping[str | os.PathLike, Strength],
             labels: Mapping[str | os.PathLike, str] | None = None) -> list[LoraReport]:
        """Carry exactly these LoRA files ({path: strength}) from now on; returns their reports.

        labels: {path: name shown in reports and `multipliers`} (default: the file's stem).
        All new files are read and checked before anything changes, so a bad file (UserError)
        leaves the model as it was. Unchanged files are neither re-read nor re-hooked.
        """
        wanted: dict[tuple, tuple[Path, tuple[float, ...]]] = {}
        names = {str(Path(k)): v for k, v in (labels or {}).items()}
        for path, strength in selection.items():
            p = Path(path)
            try:
                st = p.stat()
            except OSError:
                raise UserError(f"LoRA file not found: {p.name}") from None
            wanted[(str(p.resolve()), st.st_mtime_ns, st.st_size)] = (p, parse_schedule(strength))
        new = {k: self._prepare(p) for k, (p, _) in wanted.items() if k not in self._active}
        for key in [k for k in self._active if k not in wanted]:
            self._detach(self._active.pop(key))
        for key, (report, deltas) in new.items():
            self._active[key] = self._attach(key, report, deltas, wanted[key][1])
        for key, (path, schedule) in wanted.items():
            act = self._active[key]
            act.schedule = schedule
            act.set(schedule[0])
            act.report.name = names.get(str(path), path.stem)
        return [self._active[k].report for k in wanted]

    def materialize(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Make every branch's copy for the device and dtype the model computes in, now.

        Under mmgp the layers' weights (and so the branches) live on the CPU while the inputs arrive
        on the GPU: the copies, and the strengths, must not first be made inside a compiled block's trace.
        """
        probe = torch.empty(0, device=device, dtype=dtype)
        for hook in self._hooks.values():
            for br in hook.branches:
                br._for(probe)
        for act in self._active.values():  # the strength beside the inputs: no CPU scalar in a CUDA graph
            act.tensor = act.tensor.to(probe.device)

    def step_start(self, step: int, steps: int) -> None:
        """Set each LoRA's strength for denoising step `step` of `steps` (the pipeline's hook)."""
        for act in self._active.values():
            act.set(strength_at(act.schedule, step, steps))

    def remove_all(self) -> None:
        self.sync({})

    @property
    def multipliers(self) -> dict[str, float]:
        """Current strength of each active LoRA, by name."""
        return {a.report.name: a.current for a in self._active.values()}

    @property
    def reports(self) -> list[LoraReport]:
        return [a.report for a in self._active.values()]

    # -- internals

    def _prepare(self, path: Path) -> tuple[LoraReport, dict[str, ModuleDelta]]:
        """Read, convert and match one file against the model; nothing is attached yet."""
        sd = load_lora_file(path)
        self.loads += 1
        conv = self.converter(sd)
        modules = dict(self.model.named_modules())
        unmatched = dict(conv.unmatched)
        deltas: dict[str, ModuleDelta] = {}
        used: set[str] = set()
        for name, md in conv.deltas.items():
            reason = _mismatch(modules.get(name), md)
            if reason:
                unmatched.update({k: reason for k in md.keys if k not in used})
                continue
            deltas[name] = md
            used.update(md.keys)
        for k in used:  # a fused key used by one split part is not unmatched
            unmatched.pop(k, None)
        name = path.stem
        report = LoraReport(name=name, path=str(path), format=conv.format, applied=len(used), total=conv.total,
                            modules=len(deltas), unmatched=unmatched)
        if not deltas:
            sample = ", ".join(list(sd)[:3])
            raise UserError(f"LoRA {path.name}: none of its {conv.total} tensors matches this model "
                            f"(wrong model family or unknown format; keys like {sample})")
        log.info(report.summary)
        if unmatched:
            listed = "; ".join(f"{k} ({r})" for k, r in list(unmatched.items())[:10])
            more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
            log.warning("LoRA %s: %d tensors not applied: %s%s", path.name, len(unmatched), listed, more)
        return report, deltas

    def _attach(self, key: tuple, report: LoraReport, deltas: dict[str, ModuleDelta],
                schedule: tuple[float, ...]) -> _Active:
        act = _Active(key=key, report=report, schedule=schedule)
        act.set(schedule[0])
        modules = dict(self.model.named_modules())
        for name, md in deltas.items():
            module = modules[name]
            hook = self._hooks.get(name)
            if hook is None:
                hook = self._hooks[name] = _Hook(module)
            hook.branches.append(_Branch(md, module, act))
            act.modules.append(name)
        return act

    def _detach(self, act: _Active) -> None:
        for name in act.modules:
            hook = self._hooks[name]
            hook.branches = [b for b in hook.branches if b.owner is not act]
            if not hook.branches:  # no hook left at all: the layer is exactly the base layer again
                hook.handle.remove()
                del self._hooks[name]


def _mismatch(module: nn.Module | None, md: ModuleDelta) -> str | None:
    """Why a delta cannot go on this module (None: it can)."""
    if module is None:
        return "no such layer in this model"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} layers are not supported"
    shape = md.shape()
    want = (module.out_features, module.in_features)
    if shape is not None and tuple(shape) != want:
        return f"shape {tuple(shape)} does not fit layer {want} (LoRA made for another model?)"
    if md.bias is not None and md.bias.numel() != want[0]:
        return f"bias of {md.bias.numel()} values does not fit layer {want}"
    if md.magnitude is not None:
        if shape is None:
            return "DoRA magnitude without a weight delta"
        if md.magnitude.numel() != want[md.magnitude_axis]:
            return f"DoRA magnitude of {md.magnitude.numel()} values does not fit layer {want}"
    return None
