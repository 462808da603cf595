"""Merge methods on dense deltas (task arithmetic, TIES, DARE, magnitude pruning) built from three parts, and
LoRA helpers.

A *delta* is a dense tensor ``D``: ``W_ft - W_base`` for a full fine-tune, or the product
``(alpha / rank) * B @ A`` for a LoRA. Every method in :data:`METHODS` takes a list of same-shape deltas, one
non-negative weight ``lambda_m`` per delta, and parameters (validated into :class:`MergeParameters`), and returns
one merged delta. As in mergekit's generalized task arithmetic, a method is one choice of each part:

* :func:`sparsify`: ``none`` | ``magnitude`` (keep each delta's top-``density`` entries) | ``dare`` (random drop,
  rescale by ``1 / density``);
* :func:`consensus`: ``none`` | ``ties`` (sign election, then only the agreeing entries are merged);
* :func:`normalise`: ``none`` | ``weights`` | ``count`` (divide by the contributing weights or inputs).

``linear`` = none/none, ``ties`` = magnitude/ties, ``dare_linear`` = dare/none, ``dare_ties`` = dare/ties,
``magnitude_prune`` = magnitude/none. Merging LoRA factors separately is *not* a merge of deltas
(``sum B_m * sum A_m`` has cross terms): the registry's ``factorwise_mean`` is explicitly legacy
(:func:`factorwise_mean`), and the exact factor-space merge is :func:`lora_concat`.

Both the whole-tensor merges of composition and the chunked merges of ``llm_merge`` run :func:`merge_chunks`
(a whole tensor is one chunk), so the two cannot drift. Numerics: methods compute in float32 (float64 if any
input is float64), on the device of the first delta, and return the promoted input dtype, so bf16 checkpoints
do not accumulate bf16 rounding over many inputs. Inputs are never modified in place.

How these semantics relate to mergekit 0.1.5 and PEFT 0.21.2 (``peft.utils.merge_utils``):

* Trimming keeps the top ``k = max(1, int(density * numel))`` entries by magnitude *per tensor*, like
  mergekit (PEFT uses ``k = int(density * numel)`` and can therefore drop a small tensor entirely).
  Entries tied in magnitude at the threshold are kept lowest flat index first, so results are deterministic
  (mergekit's unstable argsort and PEFT's topk leave that order unspecified).
* Sign election runs on the *weighted* trimmed deltas, like mergekit. PEFT elects on the unweighted deltas;
  the two agree for ``sign_method="count"`` (weights are non-negative) and for equal weights.
* ``normalize``: ``"weights"`` divides by the sum of the weights of the contributing entries (mergekit
  ``normalize: true``, our default for the TIES methods), ``"count"`` by their number (PEFT's disjoint merge),
  ``"none"`` not at all (mergekit ``normalize: false``, its default for ``dare_ties`` and ours for the methods
  without a sign election). Without an election every input contributes everywhere, as in mergekit.
  mergekit's ``lambda`` (a final scale) and ``rescale: false`` for DARE are not offered.
* DARE rescales survivors by ``1 / density`` (the DARE paper and PEFT). mergekit instead rescales each
  tensor to its pre-drop L1 norm; the two agree only approximately. Drop masks come from the caller's
  ``torch.Generator`` (PEFT and mergekit use the global RNG), drawn in input order as float32 Bernoulli
  trials on the generator's device, one draw per input with ``density < 1``: a merge is reproducible from
  the generator state alone, whatever the tensors' device or dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from mmcompose.errors import CompositionError

__all__ = [
    "METHODS",
    "MergeMethod",
    "MergeParameters",
    "Trim",
    "combine",
    "consensus",
    "dare_linear",
    "dare_ties",
    "factorwise_mean",
    "linear",
    "lora_concat",
    "magnitude_prune",
    "magnitude_trims",
    "merge_chunks",
    "merge_method",
    "normalise",
    "sparsify",
    "ties",
    "validate_parameters",
]

SignMethod = Literal["sum", "count"]
Normalize = Literal["weights", "count", "none"]
Sparsify = Literal["none", "magnitude", "dare"]
Consensus = Literal["none", "ties"]
Density = float | Sequence[float]
DeltaChunks = Callable[[int, int], torch.Tensor]
"""``deltas(start, stop)``: flat entries ``[start, stop)`` of M deltas as one (M, stop - start) float tensor that the
merge may overwrite; it may be one buffer reused by every call, as the merge holds no chunk across calls."""

CHUNK = 1 << 18  # entries per chunk in merge_chunks: 1 MiB of float32 per delta stays in cache (2^16..2^20 measured)


# ---------------------------------------------------------------------------------------------- validation


def _check_lambdas(lambdas: Sequence[float], n_inputs: int | None) -> list[float]:
    values = list(lambdas)
    if n_inputs is not None and len(values) != n_inputs:
        raise CompositionError(
            f"got {len(values)} lambda value(s) for {n_inputs} input(s); give one per input"
        )
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise CompositionError(f"lambda must be a real number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise CompositionError(f"lambda must be finite and >= 0, got {value!r}")
        checked.append(float(value))
    return checked


def _check_density_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CompositionError(f"density must be a number in (0, 1], got {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise CompositionError(f"density must be in (0, 1], got {value!r}")
    return float(value)


def _check_density(value: Any, n_inputs: int | None) -> float | tuple[float, ...]:
    """One density for all inputs, or one per input (mergekit's per-model density)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        densities = tuple(_check_density_value(v) for v in value)
        if n_inputs is not None and len(densities) != n_inputs:
            raise CompositionError(f"got {len(densities)} density value(s) for {n_inputs} delta(s)")
        return densities
    return _check_density_value(value)


def _check_sign_method(value: Any, n_inputs: int | None) -> SignMethod:
    if value not in ("sum", "count"):
        raise CompositionError(f"sign_method must be 'sum' or 'count', got {value!r}")
    return value


def _check_normalize(value: Any, n_inputs: int | None) -> Normalize:
    """Canonical string; mergekit's booleans are accepted as aliases (true = 'weights', false = 'none')."""
    if value is True:
        return "weights"
    if value is False:
        return "none"
    if value not in ("weights", "count", "none"):
        raise CompositionError(f"normalize must be 'weights', 'count' or 'none', got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- tensor prep


def _compute_dtype(dtypes: Sequence[torch.dtype]) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype): float64 only if an input is float64, output = promoted input dtype."""
    out_dtype = dtypes[0]
    for dtype in dtypes:
        if not dtype.is_floating_point:
            raise CompositionError(f"merge inputs must be floating-point tensors, got {dtype}")
        out_dtype = torch.promote_types(out_dtype, dtype)
    return (torch.float64 if torch.float64 in dtypes else torch.float32), out_dtype


def _prepare(
    deltas: Sequence[torch.Tensor], lambdas: Sequence[float]
) -> tuple[torch.dtype, torch.dtype, torch.device]:
    """(compute dtype, output dtype, device) of a whole-tensor merge, after checking the deltas and lambdas."""
    if len(deltas) == 0:
        raise CompositionError("a merge needs at least one delta")
    _check_lambdas(lambdas, len(deltas))
    shape = deltas[0].shape
    for delta in deltas[1:]:
        if delta.shape != shape:
            raise CompositionError(
                f"deltas of one tensor must share one shape, got {tuple(shape)} and {tuple(delta.shape)}"
            )
    compute_dtype, out_dtype = _compute_dtype([d.dtype for d in deltas])
    return compute_dtype, out_dtype, deltas[0].device


@dataclass(frozen=True)
class Trim:
    """Magnitude trimming of one delta to exactly ``k`` entries: every entry with ``|D| > threshold`` survives, and of
    the entries with ``|D| == threshold`` those up to flat index ``last_tie``, so ties go to the lowest index first."""

    threshold: float
    last_tie: int

    def apply_(self, delta: torch.Tensor, offset: int) -> torch.Tensor:
        """Zero, in place, the dropped entries of the flat chunk ``delta`` that starts at entry ``offset``.

        ``hardshrink(x, c)`` zeroes ``|x| <= c`` in one pass: entries up to ``last_tie`` use for ``c`` the float
        just below the threshold (so ties survive), the others the threshold itself.
        """
        threshold = torch.tensor(self.threshold, dtype=delta.dtype)
        below = torch.nextafter(threshold, torch.zeros_like(threshold)).item()
        cut = min(max(self.last_tie + 1 - offset, 0), len(delta))
        for part, cutoff in ((delta[:cut], below), (delta[cut:], self.threshold)):
            if len(part):
                part.copy_(torch.hardshrink(part, cutoff))
        return delta


def _buckets(magnitudes: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each non-negative float (exponent and leading mantissa bits): monotonic in its value."""
    bits = magnitudes.view(torch.int32 if magnitudes.element_size() == 4 else torch.int64)
    return bits >> (8 * magnitudes.element_size() - 16)


def magnitude_trims(
    magnitudes: Callable[[], Iterable[torch.Tensor]], numel: int, densities: Sequence[float]
) -> list[Trim | None]:
    """For M deltas of ``numel`` entries, the :class:`Trim` keeping each one's top ``max(1, int(density * numel))``
    entries by magnitude (None: it keeps every entry). ``magnitudes()`` yields ``|D|`` as consecutive flat float32
    or float64 chunks of shape (M, n); it is called twice.

    The first pass counts the entries per 16-bit bucket of the float bits, which locates the bucket holding the
    k-th largest magnitude; the second collects that bucket's entries and flat indices, among which the threshold
    and the last kept tie are exact. Two vectorised passes over chunks cost a fraction of a sort or of
    ``torch.kthvalue`` over the whole delta (~20 ns per entry on CPU) and need no copy of the delta.
    """
    ks = [max(1, int(density * numel)) for density in densities]
    rows = [i for i, k in enumerate(ks) if k < numel]
    trims: list[Trim | None] = [None] * len(ks)
    if not rows:
        return trims
    counts: Any = 0
    for chunk in magnitudes():
        counts = counts + torch.stack([torch.bincount(_buckets(chunk[i]), minlength=1 << 15) for i in rows])
        like = chunk
    histogram = dict(zip(rows, counts, strict=True))
    at_or_above = {i: histogram[i].flip(0).cumsum(0).flip(0) for i in rows}  # entries in buckets >= b
    bucket = {i: int((at_or_above[i] >= ks[i]).sum()) - 1 for i in rows}
    # The bucket's entries go to buffers sized from the counts: small pieces kept across the pass would fragment
    # the heap between the chunk-sized temporaries (measured: +1 GB RSS on a 65M-entry tensor).
    members = {i: int(histogram[i][bucket[i]]) for i in rows}
    values = {i: like.new_empty(members[i]) for i in rows}
    indices = {i: torch.empty(members[i], dtype=torch.int64, device=like.device) for i in rows}
    filled = dict.fromkeys(rows, 0)
    offset = 0
    for chunk in magnitudes():
        buckets = _buckets(chunk)
        for i in rows:
            index = torch.nonzero(buckets[i] == bucket[i]).flatten()
            end = filled[i] + len(index)
            torch.index_select(chunk[i], 0, index, out=values[i][filled[i] : end])
            torch.add(index, offset, out=indices[i][filled[i] : end])
            filled[i] = end
        offset += chunk.shape[1]
    for i in rows:
        above = int(at_or_above[i][bucket[i] + 1]) if bucket[i] + 1 < len(at_or_above[i]) else 0
        need = ks[i] - above  # how many of the bucket's entries survive
        threshold = torch.kthvalue(values[i], members[i] - need + 1).values
        missing = need - int((values[i] > threshold).sum())
        trims[i] = Trim(threshold.item(), int(indices[i][values[i] == threshold][missing - 1]))
    return trims


def _trim(flat: torch.Tensor, trims: Sequence[Trim | None], offset: int) -> torch.Tensor:
    """Apply each row's trim, in place, to a (M, n) chunk starting at flat entry ``offset``."""
    for row, trim in zip(flat, trims, strict=True):
        if trim is not None:
            trim.apply_(row, offset)
    return flat


def _drop_and_rescale(stacked: torch.Tensor, densities: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    kept = []
    for delta, rho in zip(stacked, densities, strict=True):
        if rho >= 1:
            kept.append(delta)
            continue
        probabilities = torch.full(delta.shape, rho, dtype=torch.float32, device=generator.device)
        mask = torch.bernoulli(probabilities, generator=generator).to(device=delta.device, dtype=delta.dtype)
        kept.append(delta * mask / rho)
    return torch.stack(kept)


def _sum_rows(stack: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """``stack.sum(dim=0)``, same order, as elementwise adds: torch's sum over the first dim of a (M, n) tensor
    measured ~6x slower on CPU. ``in_place`` sums into the first row instead of a new tensor."""
    total = stack[0] if in_place else stack[0].clone()
    for row in stack[1:]:
        total.add_(row)
    return total


# ------------------------------------------------------------------------------------------ the three parts
# Each part works on one (M, n) chunk of M flat deltas and may overwrite it; a method is one choice of each.


def sparsify(
    kind: Sparsify,
    chunk: torch.Tensor,
    offset: int,
    densities: Sequence[float],
    trims: Sequence[Trim | None],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sparsify the chunk that starts at flat entry ``offset``: ``"none"`` keeps it, ``"magnitude"`` applies each
    delta's precomputed :class:`Trim` (no rescale), ``"dare"`` drops entries at random and rescales by ``1 / density``
    (DARE draws over whole deltas, so its chunk is always the whole tensor)."""
    if kind == "magnitude":
        return _trim(chunk, trims, offset)
    if kind == "dare":
        if not isinstance(generator, torch.Generator):
            raise CompositionError("DARE needs a torch.Generator so that its random drop is reproducible")
        return _drop_and_rescale(chunk, densities, generator)
    return chunk


def consensus(
    kind: Consensus, weighted: torch.Tensor, sign_method: SignMethod
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(contributions, elected sign) of the weighted sparse deltas.

    ``"none"``: every entry contributes as it is, no sign. ``"ties"``: TIES sign election (``"sum"`` of the weighted
    deltas, or ``"count"`` of their signs), +1 where the election is +0; the contributions are then ``|entry|`` where
    the entry agrees with the elected sign and 0 elsewhere, so zero entries (trimmed, dropped, zero-weighted) never
    agree. Same agreement as PEFT's ``calculate_majority_sign_mask`` and mergekit's ``get_mask``, in fewer passes.
    """
    if kind == "none":
        return weighted, None
    election = _sum_rows(weighted if sign_method == "sum" else weighted.sign())
    # +-1; +1 for an election of +0 (one of -0 means every entry is -0, which agrees with no sign anyway)
    elected = torch.copysign(torch.ones((), dtype=election.dtype, device=election.device), election)
    return weighted.mul_(elected).clamp_min_(0), elected


def normalise(
    merged: torch.Tensor, contributions: torch.Tensor, elected: torch.Tensor | None, weights: torch.Tensor,
    how: Normalize,
) -> torch.Tensor:
    """Divide the merged chunk by ``"weights"``, the sum of the weights of the contributing inputs, or ``"count"``,
    their number; ``"none"`` leaves it. Without a sign election every input contributes everywhere (mergekit's
    divisor ``weights.sum()``); after one, only the agreeing entries (the disjoint merge). Overwrites
    ``contributions``.

    A zero divisor means nothing contributed and ``merged`` is 0 there, so it is replaced: by 1 without an
    election (mergekit), else by the smallest positive weight (or 1), which no non-zero divisor is below.
    """
    if how == "none":
        return merged
    if elected is None:
        total = len(weights) if how == "count" else float(weights.sum())
        return merged.div_(total if total != 0 else 1.0)
    agree = contributions.sign_()
    divisor = _sum_rows(agree if how == "count" else agree.mul_(weights))
    smallest = 1.0 if how == "count" else min((w for w in weights.flatten().tolist() if w > 0), default=1.0)
    return merged.div_(divisor.clamp_min_(smallest))


def combine(
    sparse: torch.Tensor, weights: torch.Tensor, kind: Consensus, sign_method: SignMethod, how: Normalize
) -> torch.Tensor:
    """Weigh the sparse deltas, find their consensus, sum the contributions and normalise: one merged chunk."""
    contributions, elected = consensus(kind, sparse.mul_(weights), sign_method)
    # Without an election nothing reads the contributions again, so they are summed in place: a fresh chunk per call
    # costs page faults on memory that malloc hands back (see llm_merge.Scratch), and task arithmetic has no other cost.
    merged = _sum_rows(contributions, in_place=elected is None)
    if elected is not None:
        merged.mul_(elected)
    return normalise(merged, contributions, elected, weights, how)

# ------------------------------------------------------------------------------------------- LoRA helpers


def _check_factors(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor]) -> None:
    if len(As) == 0 or len(As) != len(Bs):
        raise CompositionError(f"need one B per A and at least one pair, got {len(As)} A and {len(Bs)} B")
    for a, b in zip(As, Bs, strict=True):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise CompositionError(
                f"LoRA factors must be A (rank, in), B (out, rank), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if a.shape[1] != As[0].shape[1] or b.shape[0] != Bs[0].shape[0]:
            raise CompositionError("all LoRA factors of one layer must have the same in and out features")


def lora_concat(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    lambdas: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA-space linear merge: ``B_cat @ A_cat == sum_m lambda_m * scale_m * B_m @ A_m``.

    ``A_cat`` stacks the rows ``lambda_m * scale_m * A_m`` (rank ``sum_m r_m``) and ``B_cat`` stacks the
    columns ``B_m`` unchanged, as PEFT's ``add_weighted_adapter(combination_type="cat")`` does: the whole
    coefficient goes on A, so B is copied bit for bit, a zero lambda gives zero rows, and the merged
    adapter must be applied with scale 1 (``alpha == rank``). ``scale_m`` is the LoRA's ``alpha / rank``.
    The coefficient is applied in float32/float64 and A_cat is returned in the promoted input dtype.
    """
    _check_factors(As, Bs)
    values = _check_lambdas(lambdas, len(As))
    scale_values = list(scales)
    if len(scale_values) != len(As) or not all(
        isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        for s in scale_values
    ):
        raise CompositionError(
            f"need one finite, positive LoRA scale (alpha / rank) per input, got {scales!r}"
        )
    compute_dtype, a_dtype = _compute_dtype([a.dtype for a in As])
    _, b_dtype = _compute_dtype([b.dtype for b in Bs])
    device = As[0].device
    a_cat = torch.cat(
        [
            (a.to(device=device, dtype=compute_dtype) * (lam * scale)).to(a_dtype)
            for a, lam, scale in zip(As, values, scale_values, strict=True)
        ]
    )
    b_cat = torch.cat([b.to(device=device, dtype=b_dtype) for b in Bs], dim=1)
    return a_cat, b_cat


def factorwise_mean(
    As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], lambdas: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy: ``(sum_m lambda_m A_m, sum_m lambda_m B_m)``, as the official ModelCompose code merges LoRAs.

    Kept only to reproduce that code. It is *not* a merge of deltas: the product of the averaged factors is
    ``sum_m sum_n lambda_m lambda_n B_m @ A_n``, whose cross terms ``m != n`` no input ever learnt. The
    adapter's own ``alpha / rank`` is left to the caller, as in the official code.
    """
    _check_factors(As, Bs)
    if any(a.shape != As[0].shape for a in As):
        raise CompositionError("factor-wise averaging needs LoRAs of the same rank")
    return linear(As, lambdas), linear(Bs, lambdas)


# ------------------------------------------------------------------------------------------------ registry


def _checked(check: Callable[[Any, int | None], Any]) -> Any:
    """A pydantic before-validator that runs one of the checks above: its one-line CompositionError passes through
    pydantic unchanged (pydantic wraps only ValueError and AssertionError)."""
    return classmethod(lambda cls, value: check(value, None))


class MergeParameters(BaseModel):
    """The parameters of every merge method, validated once; a method declares which of them it takes.

    ``density`` is one fraction in (0, 1] for every input or one per input (mergekit's per-model density);
    ``sign_method`` is TIES' election; ``normalize`` also takes mergekit's booleans (true = ``"weights"``,
    false = ``"none"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    density: float | tuple[float, ...] | None = None
    sign_method: SignMethod = "sum"
    normalize: Normalize = "none"

    _density = field_validator("density", mode="before")(_checked(_check_density))
    _sign_method = field_validator("sign_method", mode="before")(_checked(_check_sign_method))
    _normalize = field_validator("normalize", mode="before")(_checked(_check_normalize))

    def densities(self, n_inputs: int) -> list[float]:
        """One density per input (1.0, keep everything, where none is set)."""
        if self.density is None:
            return [1.0] * n_inputs
        if isinstance(self.density, tuple):
            if len(self.density) != n_inputs:
                raise CompositionError(f"got {len(self.density)} density value(s) for {n_inputs} delta(s)")
            return list(self.density)
        return [self.density] * n_inputs


@dataclass(frozen=True)
class MergeMethod:
    """A merge method as mergekit's generalized task arithmetic composes one: a way to sparsify each delta, a way to
    reach consensus between them, and a default normalisation, applied by :func:`merge_chunks` to whole tensors and
    to streamed chunks alike. ``space="factors"`` marks the legacy method that averages LoRA factors instead of
    merging deltas (:func:`factorwise_mean`); it takes no parameters and is not callable on deltas.
    """

    name: str
    sparsify: Sparsify
    consensus: Consensus
    normalize: Normalize = "none"
    space: Literal["deltas", "factors"] = "deltas"

    @property
    def required(self) -> tuple[str, ...]:
        return ("density",) if self.sparsify != "none" else ()

    @property
    def optional(self) -> Mapping[str, Any]:
        if self.space == "factors":
            return MappingProxyType({})
        election = {"sign_method": "sum"} if self.consensus == "ties" else {}
        return MappingProxyType({**election, "normalize": self.normalize})

    @property
    def parameters(self) -> tuple[str, ...]:
        return (*self.required, *self.optional)

    @property
    def random(self) -> bool:
        return self.sparsify == "dare"

    def validate(self, params: Mapping[str, Any], lambdas: Sequence[float] | None = None) -> MergeParameters:
        """``params`` checked against this method (unknown or missing keys, values, per-input lengths), with the
        method's defaults filled in; ``lambdas``, if given, are checked too."""
        n_inputs = None
        if lambdas is not None:
            n_inputs = len(_check_lambdas(lambdas, None))
            if n_inputs == 0:
                raise CompositionError(f"merge method '{self.name}' needs at least one input")
        accepted = ", ".join(self.parameters) or "none"
        for key in params:
            if key not in self.parameters:
                raise CompositionError(f"merge method '{self.name}' has no parameter '{key}' (accepted: {accepted})")
        for key in self.required:
            if key not in params:
                raise CompositionError(f"merge method '{self.name}' needs parameter '{key}'")
        checked = MergeParameters.model_validate({**self.optional, **params})
        if n_inputs is not None:
            checked.densities(n_inputs)
        return checked

    def __call__(
        self,
        deltas: Sequence[torch.Tensor],
        lambdas: Sequence[float],
        params: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Merge whole same-shape deltas; only random methods use ``generator``. The result is a fresh tensor."""
        if self.space == "factors":
            raise CompositionError(f"merge method '{self.name}' averages LoRA factors, not deltas")
        compute_dtype, out_dtype, device = _prepare(deltas, lambdas)
        shape, numel = deltas[0].shape, deltas[0].numel()
        flat = [delta.reshape(-1) for delta in deltas]

        def read(start: int, stop: int) -> torch.Tensor:  # a fresh (M, n) copy each time: the merge overwrites it
            return torch.stack([d[start:stop].to(device=device, dtype=compute_dtype) for d in flat])

        if numel == 0:
            return torch.empty(shape, dtype=out_dtype, device=device)
        merged = next(merge_chunks(self.name, read, numel, lambdas, params, generator, chunk=numel)).view(shape)
        if merged.dtype == out_dtype and merged.untyped_storage().nbytes() > merged.nbytes:
            return merged.clone()  # the first row of the (M, n) stack: keep no M-fold storage alive
        return merged.to(out_dtype)


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod("linear", sparsify="none", consensus="none"),
        MergeMethod("ties", sparsify="magnitude", consensus="ties", normalize="weights"),
        MergeMethod("dare_linear", sparsify="dare", consensus="none"),
        MergeMethod("dare_ties", sparsify="dare", consensus="ties", normalize="weights"),
        MergeMethod("magnitude_prune", sparsify="magnitude", consensus="none"),
        MergeMethod("factorwise_mean", sparsify="none", consensus="none", space="factors"),
    )
}
"""Every merge method, for composition (whole tensors) and for merging LLMs (streamed chunks) alike."""


def merge_method(name: str) -> MergeMethod:
    """The registered method ``name``, or a one-line error naming the known ones."""
    method = METHODS.get(name)
    if method is None:
        raise CompositionError(f"unknown merge method '{name}' (known: {', '.join(sorted(METHODS))})")
    return method


def validate_parameters(
    name: str, params: Mapping[str, Any], lambdas: Sequence[float] | None = None
) -> dict[str, Any]:
    """Check a merge method's parameters (and lambdas, if given); return them canonical, defaults filled in.

    Raises :class:`CompositionError` for an unknown method, an unknown or missing parameter, a density
    outside (0, 1], a per-input density list of the wrong length, or a negative or non-finite lambda.
    """
    method = merge_method(name)
    return method.validate(params, lambdas).model_dump(include=set(method.parameters))


def linear(deltas: Sequence[torch.Tensor], lambdas: Sequence[float]) -> torch.Tensor:
    """Task arithmetic: ``sum_m lambda_m * D_m`` (NaiveMC; mergekit's and PEFT's ``task_arithmetic``)."""
    return METHODS["linear"](deltas, lambdas)


def ties(
    deltas: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: Density, sign_method: SignMethod = "sum",
    normalize: Normalize = "weights",
) -> torch.Tensor:
    """TIES: trim each delta to its top-``density`` entries by magnitude, elect a sign per coordinate, and
    merge only the weighted entries that agree with it.

    With the defaults this is mergekit's ``ties`` (``normalize: true``): per coordinate,
    ``sum_{m agrees} lambda_m D'_m / sum_{m agrees} lambda_m``. PEFT's ``ties`` divides by the number of
    agreeing entries (``normalize="count"``) and elects on unweighted deltas (see the module docstring).
    """
    params = {"density": density, "sign_method": sign_method, "normalize": normalize}
    return METHODS["ties"](deltas, lambdas, params)


def dare_linear(
    deltas: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: Density, generator: torch.Generator
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, rescale survivors by ``1 / density``, then
    task arithmetic. Same as PEFT's ``dare_linear`` given the same random draws; mergekit's rescales to the
    L1 norm instead of by ``1 / density``.
    """
    return METHODS["dare_linear"](deltas, lambdas, {"density": density}, generator)


def dare_ties(
    deltas: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: Density, generator: torch.Generator,
    sign_method: SignMethod = "sum", normalize: Normalize = "weights",
) -> torch.Tensor:
    """DARE's random drop and ``1 / density`` rescale, then TIES sign election and disjoint merge.

    Defaults mirror :func:`ties`; mergekit's ``dare_ties`` defaults to ``normalize: false`` (pass
    ``normalize="none"``), PEFT's divides by the agreeing count (``normalize="count"``).
    """
    params = {"density": density, "sign_method": sign_method, "normalize": normalize}
    return METHODS["dare_ties"](deltas, lambdas, params, generator)


def magnitude_prune(deltas: Sequence[torch.Tensor], lambdas: Sequence[float], *, density: Density) -> torch.Tensor:
    """Trim each delta to its top-``density`` entries by magnitude (no rescale), then task arithmetic.

    PEFT's ``magnitude_prune`` except for ``k >= 1`` and the deterministic tie order (module docstring).
    """
    return METHODS["magnitude_prune"](deltas, lambdas, {"density": density})


# ----------------------------------------------------------------------------------------------- streaming


def merge_chunks(
    name: str,
    deltas: DeltaChunks,
    numel: int,
    lambdas: Sequence[float],
    params: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    chunk: int = CHUNK,
) -> Iterator[torch.Tensor]:
    """Method ``name`` on M deltas of ``numel`` entries that are read chunk by chunk through ``deltas`` (one per
    lambda): the merged delta as consecutive flat chunks, in the deltas' dtype, each one valid until the next is
    requested. Whole-tensor merges are this with the whole tensor as one chunk.

    Magnitude sparsification reads every chunk three times (two passes find each delta's trim threshold, see
    :func:`magnitude_trims`), the others once. Memory stays at a few chunks whatever the tensor size. DARE draws one
    random mask per whole input, so that a merge is reproducible from the generator alone: it gets the whole deltas
    as one chunk.
    """
    method = merge_method(name)
    if method.space == "factors":
        raise CompositionError(f"merge method '{name}' averages LoRA factors, not deltas")
    checked = method.validate(params or {}, lambdas)
    if method.random and not isinstance(generator, torch.Generator):
        raise CompositionError(f"merge method '{name}' is random and needs a torch.Generator")
    densities = checked.densities(len(lambdas))
    step = numel if method.sparsify == "dare" else chunk
    spans = [(start, min(start + step, numel)) for start in range(0, numel, step)]
    trims: list[Trim | None] = [None] * len(lambdas)
    if method.sparsify == "magnitude":
        trims = magnitude_trims(lambda: (deltas(start, stop).abs_() for start, stop in spans), numel, densities)
    for start, stop in spans:
        sparse = sparsify(method.sparsify, deltas(start, stop), start, densities, trims, generator)
        weights = torch.tensor(list(lambdas), dtype=sparse.dtype, device=sparse.device).view(-1, 1)
        yield combine(sparse, weights, method.consensus, checked.sign_method, checked.normalize)
