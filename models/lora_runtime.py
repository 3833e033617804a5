"""LoRAs on nn.Linear layers, whatever the model family: merged into the weights, or as side branches.

A family converts a LoRA file into the canonical form below ({module name: ModuleDelta}); this
module puts it on a model in one of two ways, chosen per layer:

- merged: a LoRA with one constant strength on a layer with plain float weights (bf16, fp16, fp32)
  goes into the weights, W' = W + sum_i s_i * dW_i computed in float32 and rounded once to the
  weight's dtype (bias likewise); the forward is then the base layer's, at no cost per step. The
  original weights are kept, byte for byte, on the CPU and copied back on removal or before a
  re-merge (a strength change), so that removing a LoRA restores the base weights bit for bit.
  Under an offload manager (mmgp) the merge goes into the copy the manager streams from (see
  `WeightCopies`), not into a device copy that the next load would replace.
- side branch: forward hooks, out = base(x) + strength_t * branch(x), for per-step strength
  schedules and for layers whose weights cannot take a merge (optimum-quanto int8 `QLinear`, a bias
  delta on a layer without bias). Per-step strengths cost nothing but a float change, and removing
  a LoRA (a hook removal) restores the base output bit for bit. A layer that carries a DoRA side
  branch (which reads the base output) takes no merge at all.

`LoraManager.sync(selection)` makes the model carry exactly the selected files with the selected
strengths; it re-reads nothing, and changes neither weights nor hooks, when nothing changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
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


# ------------------------------------------------------------------------------ merges

WeightCopies = Callable[[nn.Module, str], Sequence[torch.Tensor]]
"""(module, parameter name) -> every copy of that parameter a weight change must reach.

The first is the master: the copy the model (or its offload manager) owns and loads from, whose
original bytes are kept. The others (a device copy resident right now) get the same values. The
default, `own_parameter`, is the module's own parameter; `app.offload.OffloadSession.parameter_copies`
gives mmgp's CPU copy first."""

MERGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def own_parameter(module: nn.Module, name: str) -> list[torch.Tensor]:
    """The module's parameter itself (no offload manager): the only copy there is."""
    t = getattr(module, name, None)
    return [] if t is None else [t]


def _plain_float(t: torch.Tensor | None) -> bool:
    """A plain (not quantized, not a tensor subclass) float tensor that can hold W + s * dW."""
    if t is None:
        return False
    data = t.data if isinstance(t, nn.Parameter) else t
    return type(data) is torch.Tensor and data.dtype in MERGE_DTYPES and data.device.type != "meta"


def _moved(md: ModuleDelta, device: torch.device) -> ModuleDelta:
    """The delta's tensors on `device` (where the weight to merge into lives)."""
    mv = lambda t: None if t is None else t.to(device)
    return replace(md, up=mv(md.up), down=mv(md.down), dense=mv(md.dense), bias=mv(md.bias),
                   magnitude=mv(md.magnitude), kron=None if md.kron is None else (mv(md.kron[0]), mv(md.kron[1])))


@dataclass
class _Merged:
    """A layer whose weights carry merged LoRAs: the exact original bytes and what was merged."""

    originals: dict[str, torch.Tensor]  # parameter name -> CPU copy of the original, in its own dtype
    signature: tuple  # ((LoRA key, strength), ...) in merge order


@dataclass
class _Active:
    """One attached LoRA file."""

    key: tuple  # (resolved path, mtime_ns, size)
    report: LoraReport
    schedule: tuple[float, ...]
    current: float = 0.0  # set() keeps it, `tensor` and `on` together
    modules: list[str] = field(default_factory=list)
    deltas: dict[str, ModuleDelta] = field(default_factory=dict)  # by module name, kept for re-merges
    # the strength again as a 0-dim tensor changed in place, and whether it is non-zero: compiled blocks
    # treat a float read in a hook as a constant and would recompile for every new strength
    tensor: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float32))
    on: bool = False

    def set(self, strength: float) -> None:
        self.current, self.on = strength, strength != 0.0
        self.tensor.fill_(strength)

    @property
    def constant(self) -> bool:
        """One strength for every step: mergeable into the weights."""
        return len(set(self.schedule)) == 1


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
    merged: int = 0  # of those, layers that carry it merged into their weights (the rest: side branches)

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
    # bool, integer or complex factors are no LoRA weights (a cast would apply them silently, complex ones losing
    # their imaginary part); an integer scalar is a hyperparameter (alpha, rank) and casts exactly
    odd = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in sd.items() if not t.is_floating_point()
           and (t.is_complex() or t.dtype == torch.bool or t.numel() != 1)]
    if odd:
        listed = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        raise UserError(f"LoRA file {path.name} holds {len(odd)} tensor(s) of a type a LoRA cannot use: {listed}; "
                        "refused (LoRA weights are floating point)")
    # a NaN or Inf weight turns every image into NaN pixels that still save as a "done" job: refuse the file
    bad = [k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(f"LoRA file {path.name} holds NaN or infinite values in {len(bad)} tensor(s): {listed}; "
                        "refused (a broken training run or download?)")
    return sd


class LoraManager:
    """Keeps a model's LoRAs (merged weights and side branches) in line with the current job's selection.

    merge: put constant-strength LoRAs into plain float weights (False: side branches only, as for
    int8 layers). weights: where a layer's weights live (`WeightCopies`; default: the module's own
    parameters; under mmgp, the session's `parameter_copies`).
    """

    def __init__(self, model: nn.Module, converter: Converter, *, merge: bool = True,
                 weights: WeightCopies | None = None, merge_room: Callable[[], float] | None = None):
        self.model = model
        self.converter = converter
        self.merge = merge
        # bytes of RAM that newly merged layers may keep their originals in, asked at each sync (None: no
        # limit); layers beyond it keep side branches, so merging never costs a low-RAM machine its RAM
        self.merge_room = merge_room
        self._room = float("inf")
        self.weights: WeightCopies = weights or own_parameter
        self._active: dict[tuple, _Active] = {}
        self._hooks: dict[str, _Hook] = {}
        self._merged: dict[str, _Merged] = {}
        self._changes = 0  # layers changed by the last sync
        self.loads = 0  # files read and converted (tests: nothing is redone when unchanged)

    # -- public

    def sync(self, selection: Mapping[str | os.PathLike, Strength],
             labels: Mapping[str | os.PathLike, str] | None = None) -> list[LoraReport]:
        """Carry exactly these LoRA files ({path: strength}) from now on; returns their reports.

        labels: {path: name shown in reports and `multipliers`} (default: the file's stem).
        All new files are read and checked before anything changes, so a bad file (UserError)
        leaves the model as it was. Unchanged files are not re-read; layers whose LoRAs and
        strengths are unchanged are left alone (neither re-merged nor re-hooked).
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
            del self._active[key]
        for key, (report, deltas) in new.items():
            self._active[key] = _Active(key=key, report=report, schedule=wanted[key][1], modules=list(deltas),
                                        deltas=deltas)
        for key, (path, schedule) in wanted.items():
            act = self._active[key]
            act.schedule = schedule
            act.set(schedule[0])
            act.report.name = names.get(str(path), path.stem)
        self._arrange()
        return [self._active[k].report for k in wanted]

    def materialize(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Make every branch's copy for the device and dtype the model computes in, now.

        Under mmgp the layers' weights (and so the branches) live on the CPU while the inputs arrive
        on the GPU: the copies, and the strengths, must not first be made inside a compiled block's trace.
        Merged LoRAs need nothing here: they are in the weights mmgp moves.
        """
        probe = torch.empty(0, device=device, dtype=dtype)
        for hook in self._hooks.values():
            for br in hook.branches:
                br._for(probe)
        for act in self._active.values():  # the strength beside the inputs: no CPU scalar in a CUDA graph
            act.tensor = act.tensor.to(probe.device)

    def step_start(self, step: int, steps: int) -> None:
        """Set each LoRA's strength for denoising step `step` of `steps` (the pipeline's hook).

        Merged LoRAs have one strength for every step: for them this changes nothing."""
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

    @property
    def merged_layers(self) -> list[str]:
        """Names of the layers whose weights carry merged LoRAs now."""
        return list(self._merged)

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
            log.warning("LoRA %s: no tensor applies: %s", path.name,
                        "; ".join(f"{k} ({r})" for k, r in list(unmatched.items())[:20]))
            sample = ", ".join(list(sd)[:3])
            raise UserError(f"LoRA {path.name}: none of its {conv.total} tensors matches this model "
                            f"({_first_reasons(unmatched)}; keys like {sample})")
        log.info(report.summary)
        if unmatched:
            listed = "; ".join(f"{k} ({r})" for k, r in list(unmatched.items())[:10])
            more = f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
            log.warning("LoRA %s: %d tensors not applied: %s%s", path.name, len(unmatched), listed, more)
        return report, deltas

    def _arrange(self) -> None:
        """Bring every layer in line with the active LoRAs: restore, re-hook and merge where they changed."""
        modules = dict(self.model.named_modules())
        wanted: dict[str, list[tuple[_Active, ModuleDelta]]] = {}
        for act in self._active.values():
            for name, md in act.deltas.items():
                wanted.setdefault(name, []).append((act, md))
        merged_in: dict[int, int] = {}
        self._changes = 0
        self._room = float("inf") if self.merge_room is None else float(self.merge_room())
        for name in dict.fromkeys([*self._merged, *self._hooks, *wanted]):
            for act in self._arrange_layer(name, modules[name], wanted.get(name, [])):
                merged_in[id(act)] = merged_in.get(id(act), 0) + 1
        for act in self._active.values():
            act.report.merged = merged_in.get(id(act), 0)
        if self._changes:
            kept = sum(t.nbytes for merged in self._merged.values() for t in merged.originals.values())
            log.info("LoRAs: %d layers merged (%.0f MB of original weights kept in RAM), %d with side branches",
                     len(self._merged), kept / 2**20, len(self._hooks))

    def _split(self, name: str, module: nn.Module, items: list[tuple[_Active, ModuleDelta]]
               ) -> tuple[list[tuple[_Active, ModuleDelta]], list[tuple[_Active, ModuleDelta]]]:
        """(to merge, as side branches) of one layer's LoRAs; a constant zero strength takes neither."""
        weight = next(iter(self.weights(module, "weight")), None)
        mergeable = self.merge and _plain_float(weight)
        if mergeable and name not in self._merged:  # a new merge keeps a copy of the weight: is there room?
            need = weight.nbytes + (module.bias.nbytes if getattr(module, "bias", None) is not None else 0)
            mergeable = need <= self._room
            if mergeable and any(act.constant for act, _ in items):
                self._room -= need
        bias_ok = mergeable and _plain_float(next(iter(self.weights(module, "bias")), None))
        merge, side = [], []
        for act, md in items:
            if act.constant and act.schedule[0] == 0.0:
                continue
            if mergeable and act.constant and (md.bias is None or bias_ok):
                merge.append((act, md))
            else:
                side.append((act, md))
        if merge and any(md.magnitude is not None for _, md in side):
            # a DoRA branch computes from the base layer's output: the layer keeps its own weights
            ids = {id(act) for act, _ in merge + side}
            side, merge = [(a, md) for a, md in items if id(a) in ids], []
        return merge, side

    def _arrange_layer(self, name: str, module: nn.Module, items: list[tuple[_Active, ModuleDelta]]
                       ) -> list[_Active]:
        """One layer: its merged LoRAs and side branches as `items` want them; returns the LoRAs merged."""
        merge, side = self._split(name, module, items)
        signature = tuple((act.key, act.current) for act, _ in merge)
        current = self._merged.get(name)
        if current is not None and current.signature != signature:
            # back to the exact original first: a DoRA branch made below reads the base weight
            self._restore(module, current)
            del self._merged[name]
            self._changes += 1
        hook = self._hooks.get(name)
        owners = [b.owner for b in hook.branches] if hook else []
        if len(owners) != len(side) or any(o is not act for o, (act, _) in zip(owners, side)):
            have = {id(b.owner): b for b in hook.branches} if hook else {}
            branches = [have.get(id(act)) or _Branch(md, module, act) for act, md in side]
            self._changes += 1
            if branches:
                if hook is None:
                    hook = self._hooks[name] = _Hook(module)
                hook.branches = branches
            elif hook is not None:  # no hook left at all: the layer is exactly the base layer again
                hook.handle.remove()
                del self._hooks[name]
        if signature and name not in self._merged:
            self._merged[name] = self._merge(module, merge, signature)
            self._changes += 1
        return [act for act, _ in merge]

    @torch.no_grad()
    def _merge(self, module: nn.Module, items: list[tuple[_Active, ModuleDelta]], signature: tuple) -> _Merged:
        """W' = W + sum s_i dW_i (and b' = b + sum s_i db_i) in float32, rounded once, into every copy.

        The new values are computed in full before any copy changes; the originals' exact bytes are
        kept on the CPU. DoRA's delta is taken against the original weight, as its side branch does.
        """
        weights = list(self.weights(module, "weight"))
        w = weights[0].detach()
        w32 = w.float()
        total = bias_total = None
        for act, md in items:
            md = _moved(md, w.device)
            if md.up is not None or md.kron is not None or md.dense is not None:
                if total is None:
                    total = w32.clone()
                total.add_(dense_delta(md, w32), alpha=act.current)
            if md.bias is not None:
                if bias_total is None:
                    bias_total = next(iter(self.weights(module, "bias"))).detach().float().clone()
                bias_total.add_(md.bias.float().to(bias_total.device), alpha=act.current)
        originals, updates = {}, []
        if total is not None:
            originals["weight"] = w.to("cpu", copy=True)
            updates.append((weights, total.to(w.dtype)))
        if bias_total is not None:
            biases = list(self.weights(module, "bias"))
            originals["bias"] = biases[0].detach().to("cpu", copy=True)
            updates.append((biases, bias_total.to(biases[0].dtype)))
        for copies, value in updates:
            for t in copies:
                t.copy_(value)
        return _Merged(originals, signature)

    @torch.no_grad()
    def _restore(self, module: nn.Module, merged: _Merged) -> None:
        """Copy the original bytes back into every copy of the layer's merged parameters."""
        for pname, original in merged.originals.items():
            for t in self.weights(module, pname):
                t.copy_(original)


def _first_reasons(unmatched: dict[str, str], count: int = 2) -> str:
    """The first distinct reasons tensors were not used (a shape that does not fit, a lone factor, a layer name
    of another model family), each with a key it applies to."""
    first: dict[str, str] = {}
    for key, reason in unmatched.items():
        if reason not in first and len(first) < count:
            first[reason] = key
    more = len(set(unmatched.values())) - len(first)
    return ("; ".join(f"{key[:100]}: {reason}" for reason, key in first.items()) + (
        f"; {more} other reason(s) in the log" if more > 0 else "")) or "wrong model family or unknown format"


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
