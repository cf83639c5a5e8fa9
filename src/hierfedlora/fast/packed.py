"""Packed (unpadded) forward of BERT-family encoders: no work on padding.

A padded batch wastes compute on pad tokens: on rotten_tomatoes a batch of 16 is padded to ~48 tokens
(64 with `max_length` padding) while its examples average 27. Here every token-wise op (projections,
MLP, LayerNorm) runs on one `[tokens, hidden]` matrix holding only real tokens, and attention runs
per example (padded to a multiple of `BUCKET` tokens with its pad keys masked, in one product per
padded length). The model's own modules (PEFT LoRA wrappers included) do the maths; this file only
replaces transformers' layer loop, and only for `bert`/`roberta` models (anything else uses the
plain forward). `benchmarks/speed.py` measures it; `fast.model.FastModel` uses it.

Two properties make results independent of how batches are laid out:
- *Dropout masks are drawn as a padded loop draws them.* Each dropout draws its random mask at the
  shape a batch padded to `width` has (`FastModel.dropout_width`: the batch's longest example, as
  `data.collate` pads, or e.g. `max_length`) and keeps the entries of real tokens (`masks` computes
  only those, with the same numbers), so training equals a plain loop that pads that way, mask for
  mask (`benchmarks/speed.py` checks it).
- *An example's activations do not depend on its batch-mates.* Rows of a matrix product are
  computed the same way whatever the number of rows (we pad tiny products to `MIN_ROWS`, below
  which the BLAS picks other kernels), and attention sees only the example's own tokens, padded to
  a width its own length decides; so the frozen-prefix cache (`prefix_cache`) stores exactly what
  an uncached forward would compute.

The same two properties let several devices' batches be joined (`fast.joined`, `train.lockstep`):
they run as one, each device with its own LoRA factors, head and dropout stream, and each gets bit
for bit what it gets alone, with one set of products and attention calls for all of them. What one
device does on its rows (its dropout masks, its LoRA branch) is a method of `Pack`, which a joined
batch (`fast.joined.Joined`) overrides; the forward below is written once for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from hierfedlora.fast import masks

SUPPORTED = ("bert", "roberta")
# Below this many rows the BLAS switches to small-matrix kernels whose sums are ordered differently.
MIN_ROWS = 16
# Attention pads each example to a multiple of this many tokens (its own length decides, so its
# result does not depend on its batch-mates) and runs one product per padded length: a batch of 16
# then takes ~4 calls instead of one per distinct length (~13).
BUCKET = 8


@dataclass
class Bucket:
    """Examples whose lengths round up to the same `width` (consecutive in packed order)."""

    width: int
    members: torch.Tensor  # [G] batch positions
    lengths: list[int]  # [G] real tokens of each
    key_mask: torch.Tensor  # [G, 1, 1, width]: 0 for a real key, -inf for padding


@dataclass
class Pack:
    """Where a batch's real tokens sit once packed.

    Examples are packed in order of length (stable), so equal-length examples are contiguous:
    `groups` holds (length, first row, end row, batch positions) per run of equal lengths.
    """

    batch: int
    width: int  # padded width that dropout masks are drawn at
    rows: torch.Tensor  # [T] each packed token's index in the padded input, flattened [B*W]
    noise_rows: torch.Tensor  # [T] each packed token's index in a flattened [B*width] mask
    firsts: torch.Tensor  # [B] packed row of each example's first token, in batch order
    unorder: torch.Tensor  # [B] each example's place in bucket order (inverse of `order`)
    order: torch.Tensor  # [B] batch position of each example in bucket order (the buckets' members end to end)
    groups: list[tuple[int, int, int, torch.Tensor]]
    buckets: list[Bucket]
    slots: torch.Tensor  # packed row behind every bucket slot, buckets concatenated (padding: the example's first row)
    gather: torch.Tensor  # [T] the bucket slot (buckets concatenated) of each packed row

    _runs: dict = field(default_factory=dict, repr=False, init=False)

    # -- what one device does on these rows (`fast.joined.Joined` does it for several) ----------
    def noise(self, first: bool, h: int, keep: float, dev: torch.device) -> torch.Tensor:
        """The rows of a dropout mask (see `dropout`), from the default generator."""
        return _noise(self, first, h, keep, dev)

    def attention_noise(self, heads: int, p: float, first_only: bool, dev: torch.device) -> list[torch.Tensor]:
        """Each bucket's attention-dropout block (see `_attention_noise`)."""
        return _attention_noise(self, heads, p, first_only, dev)

    def lora_linear(self, mod: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
        """A PEFT LoRA Linear on these rows with the module's own factors (see `linear`)."""
        n = x.shape[0]
        scale = mod.scaling
        if scale.get("default", 1.0) == 0.0 or _zero_lora(mod):  # the LoRA branch adds exactly 0
            return _crop(mod.base_layer(pad_rows(x)), n)
        # PEFT's LoRA Linear: base(x) + B(A(dropout(x))) * scale, with our dropout mask
        xs = pad_rows(dropout(x, mod.lora_dropout["default"], self, first))
        lora = lora_branch(xs, scale["default"], [len(xs)], [(mod.lora_A["default"].weight, mod.lora_B["default"].weight)])
        return _crop(mod.base_layer(pad_rows(x)) + lora, n)

    def attention_runs(self, heads: int, first_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """Where each bucket's attention-dropout entries sit in a [B, heads, width, width] mask:
        (src, length, dst) runs for `masks.draw` (one per example, head and real query row, over
        its real keys) into the buckets' [G, heads, queries, width] blocks laid end to end, and
        the blocks' offsets (last: total size)."""
        key = (heads, first_only)
        if key not in self._runs:
            # per example, in packed order (the buckets' members end to end); no loop over
            # buckets: this runs once per step (`python benchmarks/masks.py` times it, last line;
            # docs/benchmarks.md has the per-bucket version's time)
            n = np.array([x for bk in self.buckets for x in bk.lengths])
            width = (n + BUCKET - 1) // BUCKET * BUCKET  # its bucket's width
            nq = np.ones_like(n) if first_only else n  # real query rows
            block = heads * (1 if first_only else width) * width  # its [heads, queries, width] block
            start = np.cumsum(block) - block
            per = heads * nq  # runs: one per head and real query row
            g = np.repeat(np.arange(len(n)), per)
            k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
            h, i = k // nq[g], k % nq[g]
            W = self.width
            src = ((self.order.numpy()[g] * heads + h) * W + i) * W
            dst = start[g] + (h * (1 if first_only else width[g]) + i) * width[g]
            sizes = [len(bk.members) * heads * (1 if first_only else bk.width) * bk.width for bk in self.buckets]
            self._runs[key] = (src, n[g], dst, [0, *np.cumsum(sizes).tolist()])
        return self._runs[key]

    @property
    def first_noise_rows(self) -> torch.Tensor:
        """Each example's first token in a flattened [B*width] mask, batch order."""
        return torch.arange(self.batch) * self.width


def make_pack(attention_mask: torch.Tensor, width: int | None = None) -> Pack:
    """Pack a right-padded batch ([B, W] mask: ones, then zeros). `width` is the padded width that
    dropout masks are drawn at (default W: what a loop with per-batch padding draws). Index
    arithmetic in numpy: it runs once per batch, and a loop over examples cost more than this whole
    function (docs/benchmarks.md, "batch layout in numpy")."""
    mask = attention_mask.cpu().numpy().astype(bool)
    B, W = mask.shape
    lengths = mask.sum(1)
    if not np.array_equal(mask, np.arange(W)[None, :] < lengths[:, None]):
        raise ValueError("the packed forward needs right-padded batches (mask: ones, then zeros)")
    width = max(width or W, W)
    order = np.argsort(lengths, kind="stable")
    ls = lengths[order]
    starts = np.cumsum(ls) - ls  # packed row of each example, packed order
    example = np.repeat(order, ls)
    pos = np.arange(len(example)) - np.repeat(starts, ls)
    unorder = np.empty(B, dtype=np.int64)
    unorder[order] = np.arange(B)
    t = torch.from_numpy
    order_t = t(order.astype(np.int64))
    groups = [(int(ls[i]), int(starts[i]), int(starts[i] + ls[i] * (j - i)), order_t[i:j]) for i, j in _runs_of(ls)]
    buckets, slots = _buckets(ls, starts, order_t)
    firsts = starts[unorder]
    return Pack(B, width, t(example * W + pos), t(example * width + pos), t(firsts), t(unorder), order_t,
                groups, buckets, slots, gather_index(buckets, firsts))


def gather_index(buckets: list[Bucket], firsts: np.ndarray) -> torch.Tensor:
    """For each packed row, its slot in the buckets' [G * width] slots laid end to end (`firsts`:
    packed row of each example's first token, batch order)."""
    e = np.concatenate([bk.members.numpy() for bk in buckets])
    n = np.array([x for bk in buckets for x in bk.lengths])
    w = np.concatenate([np.full(len(bk.members), bk.width) for bk in buckets])
    base = np.cumsum(w) - w  # each example's first slot
    t = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    out = np.empty(len(t), dtype=np.int64)
    out[np.repeat(firsts[e], n) + t] = np.repeat(base, n) + t
    return torch.from_numpy(out)


def _runs_of(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal consecutive values."""
    cuts = [0, *(np.flatnonzero(np.diff(values)) + 1).tolist(), len(values)]
    return list(zip(cuts[:-1], cuts[1:]))


def _buckets(ls: np.ndarray, starts: np.ndarray, order: torch.Tensor) -> tuple[list[Bucket], torch.Tensor]:
    """Attention buckets of length-sorted examples (see BUCKET)."""
    widths = (ls + BUCKET - 1) // BUCKET * BUCKET
    buckets, slots = [], []
    for i, j in _runs_of(widths):
        wb = int(widths[i])
        t = np.arange(wb)
        real = t[None, :] < ls[i:j, None]  # [G, wb]
        slots.append(np.where(real, starts[i:j, None] + t, starts[i:j, None]).reshape(-1))
        key_mask = torch.from_numpy(np.where(real, 0.0, -np.inf).astype(np.float32)[:, None, None, :])
        buckets.append(Bucket(wb, order[i:j], ls[i:j].tolist(), key_mask))
    return buckets, torch.from_numpy(np.concatenate(slots).astype(np.int64))


def supported(model: nn.Module) -> bool:
    """Whether `model` (a transformers *ForSequenceClassification) has the layout this file runs."""
    c = model.config
    if getattr(c, "model_type", "") not in SUPPORTED or getattr(c, "is_decoder", False):
        return False
    if getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    base = getattr(model, model.base_model_prefix, None)
    try:
        layer = base.encoder.layer[0]
        ok = all(hasattr(layer, a) for a in ("attention", "intermediate", "output"))
        ok = ok and all(hasattr(layer.attention.self, a) for a in ("query", "key", "value", "dropout", "scaling"))
    except AttributeError:
        return False
    return ok and getattr(c, "chunk_size_feed_forward", 0) == 0


def dropout(x: torch.Tensor, mod: nn.Module, pack: Pack, first: bool = False) -> torch.Tensor:
    """`mod(x)` for packed rows (`first`: each example's first token, batch order), with the mask a
    [B, width, h] padded batch would get (see top)."""
    if not isinstance(mod, nn.Dropout) or not mod.training or mod.p == 0.0:
        return x
    return x * pack.noise(first, x.shape[-1], 1 - mod.p, x.device)


def _noise(pack: Pack, first: bool, h: int, keep: float, dev: torch.device) -> torch.Tensor:
    """A dropout mask's rows (see `dropout`), from the default generator."""
    rows = pack.first_noise_rows if first else pack.noise_rows
    if dev.type == "cpu" and masks.available():  # the same numbers, drawn only for these rows
        r = rows.numpy()
        return masks.draw(pack.batch * pack.width * h, r * h, np.full(len(r), h), np.arange(len(r)) * h,
                          len(r) * h, keep).view(len(r), h)
    # as aten's CPU dropout: noise = bernoulli(1-p) / (1-p); out = x * noise
    noise = torch.empty(pack.batch * pack.width, h, device=dev).bernoulli_(keep).div_(keep)
    return noise[rows.to(dev)]


def linear(mod: nn.Module, x: torch.Tensor, pack: Pack, first: bool = False) -> torch.Tensor:
    """`mod(x)` (a Linear or PEFT LoRA Linear) on packed rows (`first`: as in `dropout`). Products
    of fewer than MIN_ROWS rows are padded with zero rows so every row is summed the same way."""
    if getattr(mod, "scaling", None) is None:  # a plain nn.Linear
        return _crop(mod(pad_rows(x)), x.shape[0])
    return pack.lora_linear(mod, x, first)


def _crop(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first n rows of a product `pad_rows` padded (no slice when nothing was padded: its
    backward copies)."""
    return t[:n] if n < MIN_ROWS else t


def _zero_lora(mod: nn.Module) -> bool:
    """A LoRA that adds exactly 0 and learns nothing: B = 0 and neither factor trains (the frozen
    layers below the prefix cache always; `python benchmarks/first_pass.py --zero-lora` times the
    skip)."""
    return zero_factors(mod.lora_A["default"].weight, mod.lora_B["default"].weight)


def zero_factors(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether LoRA factors (A, B) add exactly 0 and learn nothing here."""
    learns = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    return not learns and not bool(b.any())


def lora_branch(x: torch.Tensor, scale: float, sizes: list[int],
                factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(x_k A_k^T) B_k^T * scale for each device k: rows sizes[k] of x (end to end) through its
    factors (A_k, B_k); one device is one part of all the rows."""
    return _LoRA.apply(x, scale, sizes, *(t for ab in factors for t in ab))


class _LoRA(torch.autograd.Function):
    """(x A^T) B^T * scale, with every product laid out so that the rank r is its first dimension,
    for each part of the rows with its own factors (`lora_branch`).

    Products with r = 8 output columns (x A^T, and in the backward dY B and dY^T (x A^T)) run
    slower in MKL than their transposes with r output rows, so the transposes are computed
    (docs/benchmarks.md, "LoRA products laid out rank-first"). Same association as PEFT's, so the
    same values up to the summation order inside a dot product. Each part's products have the
    shapes they have alone (padded to MIN_ROWS as `linear` pads), so each device gets the same
    numbers whether its rows come alone or joined with others'."""

    @staticmethod
    def forward(ctx, x, scale, sizes, *ab):
        ys, uts, start = [], [], 0
        for k, n in enumerate(sizes):
            y, ut = _lora_forward(pad_rows(x[start:start + n]), ab[2 * k], ab[2 * k + 1], scale)
            ys.append(_crop(y, n))
            uts.append(ut)
            start += n
        ctx.save_for_backward(x, *ab, *uts)
        ctx.scale, ctx.sizes = scale, sizes
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    @staticmethod
    def backward(ctx, grad):
        sizes, K, needs = ctx.sizes, len(ctx.sizes), ctx.needs_input_grad
        x, ab, uts = ctx.saved_tensors[0], ctx.saved_tensors[1:1 + 2 * K], ctx.saved_tensors[1 + 2 * K:]
        dxs, grads, start = [], [], 0
        for k, n in enumerate(sizes):
            dxk, da, db = _lora_backward(pad_rows(grad[start:start + n]), pad_rows(x[start:start + n]), ab[2 * k],
                                         ab[2 * k + 1], uts[k], ctx.scale, (needs[0], needs[3 + 2 * k], needs[4 + 2 * k]))
            dxs.append(_crop(dxk, n) if needs[0] else None)
            grads += [da, db]
            start += n
        dx = (dxs[0] if K == 1 else torch.cat(dxs)) if needs[0] else None
        return (dx, None, None, *grads)


def _lora_forward(x, a, b, scale):
    """(x A^T) B^T * scale and x A^T, transposed ([r, T]), for the backward."""
    ut = a @ x.t()
    return (ut.t() @ b.t()) * scale, ut


def _lora_backward(grad, x, a, b, ut, scale, needs):
    """(dx, dA, dB) of `_lora_forward`, each None unless `needs` says so."""
    g = grad * scale
    dut = b.t() @ g.t()  # [r, T]: d(x A^T), transposed
    return (dut.t() @ a if needs[0] else None, dut @ x if needs[1] else None, (ut @ g).t() if needs[2] else None)


def pad_rows(t: torch.Tensor) -> torch.Tensor:
    """t with zero rows appended up to MIN_ROWS (see `linear`)."""
    return F.pad(t, (0, 0, 0, MIN_ROWS - len(t))) if len(t) < MIN_ROWS else t


def _attention_noise(pack: Pack, H: int, p: float, first_only: bool, dev: torch.device) -> list[torch.Tensor]:
    """Attention-dropout blocks of each bucket, [G, H, queries, width], from the default generator:
    SDPA's math path draws its mask at [B, H, W, W]; so do we, then take each bucket's block.
    Entries for padded keys (weight 0) and padded queries (not read) may hold anything."""
    queries = [1 if first_only else bk.width for bk in pack.buckets]
    if dev.type == "cpu" and masks.available():  # the same numbers, only the real entries
        src, length, dst, offsets = pack.attention_runs(H, first_only)
        flat = masks.draw(pack.batch * H * pack.width ** 2, src, length, dst, offsets[-1], 1 - p)
        return [flat[a:b].view(len(bk.members), H, nq, bk.width)
                for a, b, bk, nq in zip(offsets, offsets[1:], pack.buckets, queries)]
    noise = torch.empty(pack.batch, H, pack.width, pack.width, device=dev).bernoulli_(1 - p).div_(1 - p)
    grow = pack.buckets[-1].width - pack.width
    if grow > 0:  # slots past the padded width hold padding: their weight is 0 anyway
        noise = F.pad(noise, (0, grow, 0, grow))
    return [noise[bk.members.to(dev), :, :nq, :bk.width] for bk, nq in zip(pack.buckets, queries)]


class PackedEncoder:
    """Runs a BERT-family sequence classifier on packed tokens (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.kind = model.config.model_type
        base = getattr(model, model.base_model_prefix)
        self.embeddings = base.embeddings
        self.layers = base.encoder.layer
        self.pooler = getattr(base, "pooler", None)

    def embed(self, input_ids: torch.Tensor, pack: Pack) -> torch.Tensor:
        """Embeddings of the real tokens (the module runs on the padded ids: positions and
        RoBERTa's padding-aware position ids stay its business), packed."""
        drop = self.embeddings.dropout
        was = drop.training
        drop.eval()  # its mask is drawn below, at the packed rows (frozen embeddings never drop)
        try:
            h = self.embeddings(input_ids=input_ids)
        finally:
            drop.train(was)
        return dropout(h.reshape(-1, h.shape[-1])[pack.rows.to(h.device)], drop, pack)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, att: nn.Module, pack: Pack,
                  first_only: bool = False) -> torch.Tensor:
        """Per-example self-attention of packed rows, one product per bucket (see BUCKET). With
        `first_only`, `q` holds each example's first-token query (batch order) and only that
        token's output is computed (batch order)."""
        H, d = att.num_attention_heads, att.attention_head_size
        p = att.dropout.p if att.training else 0.0
        dev = q.device
        blocks = pack.attention_noise(H, p, first_only, dev) if p > 0 else None  # attention dropout
        sizes = [len(bk.members) * bk.width for bk in pack.buckets]
        slots = pack.slots.to(dev)
        ks, vs = (t.index_select(0, slots).split(sizes) for t in (k, v))
        if first_only:  # batch order -> bucket order, one query per example
            qs = q.index_select(0, pack.order.to(dev)).split([len(bk.members) for bk in pack.buckets])
        else:
            qs = q.index_select(0, slots).split(sizes)
        out = []
        for j, (bk, qb, kb, vb) in enumerate(zip(pack.buckets, qs, ks, vs)):
            G, n = len(bk.members), bk.width
            # contiguous: strided batched products pick kernels by batch size, and so their sums
            kg, vg = (t.view(G, n, H, d).transpose(1, 2).contiguous() for t in (kb, vb))
            qg = qb.view(G, -1, H, d).transpose(1, 2).contiguous()
            # Written out rather than F.scaled_dot_product_attention: the fused CPU kernel's sums
            # depend on how many examples share the call (for small head sizes), these do not.
            w = torch.softmax(qg @ kg.transpose(-1, -2) * att.scaling + bk.key_mask.to(dev), dim=-1)
            if blocks is not None:
                w = w * blocks[j]
            out.append((w @ vg).transpose(1, 2).reshape(-1, H * d))
        ctx = torch.cat(out) if len(out) > 1 else out[0]  # bucket order; every slot (first_only: example)
        return ctx.index_select(0, (pack.unorder if first_only else pack.gather).to(dev))

    def layer(self, i: int, x: torch.Tensor, pack: Pack) -> torch.Tensor:
        """BertLayer.forward on packed rows: attention, add & norm, MLP, add & norm."""
        lay = self.layers[i]
        att, so = lay.attention.self, lay.attention.output
        ctx = self.attention(linear(att.query, x, pack), linear(att.key, x, pack), linear(att.value, x, pack), att, pack)
        a = so.LayerNorm(dropout(linear(so.dense, ctx, pack), so.dropout, pack) + x)
        inter = lay.intermediate.intermediate_act_fn(linear(lay.intermediate.dense, a, pack))
        out = lay.output
        return out.LayerNorm(dropout(linear(out.dense, inter, pack), out.dropout, pack) + a)

    def top_layer(self, x: torch.Tensor, pack: Pack) -> torch.Tensor:
        """The last layer, for the first token only: the classifier reads nothing else, so every
        other token needs just its key and value (~1/6 of a layer's work). Same maths and same
        dropout masks as `layer`, restricted to the rows that matter; returns [B, h], batch order."""
        lay = self.layers[len(self.layers) - 1]
        att, so = lay.attention.self, lay.attention.output
        first = x[pack.firsts.to(x.device)]
        ctx = self.attention(linear(att.query, first, pack, True), linear(att.key, x, pack), linear(att.value, x, pack),
                             att, pack, first_only=True)
        a = so.LayerNorm(dropout(linear(so.dense, ctx, pack, True), so.dropout, pack, True) + first)
        inter = lay.intermediate.intermediate_act_fn(linear(lay.intermediate.dense, a, pack, True))
        out = lay.output
        return out.LayerNorm(dropout(linear(out.dense, inter, pack, True), out.dropout, pack, True) + a)

    def layers_forward(self, x: torch.Tensor, pack: Pack, start: int, stop: int) -> torch.Tensor:
        """Layers start..stop-1 on packed rows."""
        for i in range(start, stop):
            x = self.layer(i, x, pack)
        return x

    def encode(self, x: torch.Tensor, pack: Pack, start: int = 0) -> torch.Tensor:
        """Layers start..L-1 on packed rows -> the first token's final hidden state, [B, h]."""
        return self.top_layer(self.layers_forward(x, pack, start, len(self.layers) - 1), pack)

    def head(self, first: torch.Tensor) -> torch.Tensor:
        """Logits from the first token's final hidden state [B, h], as the plain forward."""
        return self.classify(first, self.model.classifier)

    def classify(self, first: torch.Tensor, classifier) -> torch.Tensor:
        """The head's forward with `classifier` (the model's, or a device's parameters in it)."""
        if self.kind == "bert":
            return classifier(self.model.dropout(self.pooler(first[:, None, :])))
        return classifier(first[:, None, :])
