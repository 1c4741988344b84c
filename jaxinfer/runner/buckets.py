"""Step shapes: which padded shape runs a SchedulerOutput, and every shape warm-up compiles.

Two kinds of step, every shape compiled at warm-up, none after:

    decode step  every chunk is one token: T = S = a sequence bucket; on the reference backend
                 attention over a flat list of (sequence, page) items, I = an item bucket >= the
                 pages of all sequences; on the Pallas kernels the ragged kernel with one query
                 row per block and a page table of width W (I = 0).
    mixed step   prefill chunks (and decodes): T = a token bucket, S = the largest sequence
                 bucket, page table W = a width bucket; decodes attend per token, prefill chunks
                 in query blocks of up to `q_block` rows.

Host only (numpy-free too): shapes come from bucket lists, never from a request.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import NamedTuple, Sequence

from pallas_kernels import ops


def default_page_buckets(max_pages_per_seq: int) -> tuple[int, ...]:
    """Page-table widths: the full width, then quarters of it down to 4 pages."""
    widths = [max_pages_per_seq]
    while widths[-1] // 4 >= 4:
        widths.append(widths[-1] // 4)
    return tuple(sorted(widths))


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2 lo, 4 lo, ... below hi, then hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return tuple(out + [hi])


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """Attributes:
      page_size: tokens per KV page.
      num_pages: pages in the device cache (page 0 is the null page).
      max_pages_per_seq: page-table width (max_model_len / page_size, rounded up).
      token_buckets: padded token counts of mixed steps, ascending; the last must cover
        max_num_batched_tokens.
      seq_buckets: padded sequence counts, ascending; the last must cover max_num_seqs.
      page_buckets: page-table widths, ascending, the last max_pages_per_seq; None: quarters
        (`default_page_buckets`). Attention reads a step's pages up to this width.
      q_block: most query rows per attention block of a prefill chunk in mixed steps.
      max_prefill_seqs: most multi-token chunks per step (`SchedulerConfig.max_prefill_seqs`).
      pages_per_item: pages per work item of decode attention (bigger items make bigger matmuls
        but waste part of each sequence's last item).
      attention_backend: `pallas_kernels.ops` backend name.
      sequence_parallel_size: devices of the `seq` mesh axis (tokens and KV pages split over them).
      kv_cache_dtype: "auto" (the model's dtype), "int8" or "fp8" pages (`pallas_kernels.kv_quant`).
      num_speculative_tokens: K, most drafts a sequence verifies (0: no speculative decoding).
      draft_tree: verify steps verify draft trees (`speculative.tree`): decode steps' attention
        takes per-row masks (`PagedAttentionMeta.tree_mask`), verify steps their parents.
    """

    page_size: int
    num_pages: int
    max_pages_per_seq: int
    token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    seq_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    page_buckets: tuple[int, ...] | None = None
    q_block: int = 32
    max_prefill_seqs: int = 4
    pages_per_item: int = 2
    attention_backend: str = "auto"
    sequence_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    num_speculative_tokens: int = 0
    draft_tree: bool = False

    @property
    def use_decode_items(self) -> bool:
        """Decode steps as (sequence, page-group) work items: the reference backend without
        sequence parallelism (else the ragged path, one query per block)."""
        return ops.uses_decode_items(self.attention_backend) and self.sequence_parallel_size == 1

    def __post_init__(self):
        if self.page_buckets is None:
            object.__setattr__(self, "page_buckets", default_page_buckets(self.max_pages_per_seq))
        for name in ("token_buckets", "seq_buckets", "page_buckets"):
            b = tuple(getattr(self, name))
            object.__setattr__(self, name, b)
            if not b or list(b) != sorted(set(b)) or b[0] <= 0:
                raise ValueError(f"{name} must be ascending positive integers, got {b}")
        if self.page_buckets[-1] < self.max_pages_per_seq:
            raise ValueError(f"the last page bucket {self.page_buckets[-1]} must cover max_pages_per_seq="
                             f"{self.max_pages_per_seq}")
        if self.num_pages < 2:
            raise ValueError(f"num_pages must be at least 2 (page 0 is the null page), got {self.num_pages}")
        ops.check_backend_name(self.attention_backend)

    def item_buckets(self, num_seqs: int) -> tuple[int, ...]:
        """Work-item counts of a decode step with `num_seqs` sequence slots: 1, 4, 16, ... items per
        sequence on average, up to every sequence at full length. Growing by 4 rather than 2 halves
        the decode graphs to compile (start-up) for at most 4x the attention items of a step, whose
        cost is small beside the weights' at the batch sizes the reference backend serves
        (docs/ARCHITECTURE.md decision 49)."""
        top = num_seqs * -(-self.max_pages_per_seq // self.pages_per_item)
        out, n = [], num_seqs
        while n < top:
            out.append(n)
            n *= 4
        return tuple(out + [top])

    def mixed_q_block(self, num_tokens: int) -> int:
        """Query rows per attention block of the prefill chunks in a mixed step of `num_tokens`
        (a power of two; each chunk may own one partial block, so blocks stay below T / P rows)."""
        rows = max(1, min(self.q_block, num_tokens // self.max_prefill_seqs))
        return 1 << (rows.bit_length() - 1)


class StepShape(NamedTuple):
    T: int  # tokens
    S: int  # sequence slots
    W: int  # page-table width (1 on decode steps with work items)
    q_block: int  # query rows per prefill block (mixed steps; 1 on decode steps)
    I: int  # (sequence, page) work items (reference decode steps; else 0)

    @property
    def is_decode(self) -> bool:
        return self.I > 0


# "hybrid" layer loop: decode / verify steps of at most this many rows run one unrolled graph (SmolLM2 on
# CPU: 1-row decode steps 1.11x, 4-row verify steps ~1.1x the per-layer loop; at 8 rows alike, so
# larger steps keep the per-layer graphs, ~2 s quicker to compile per shape; ARCHITECTURE decision 80)
HYBRID_ROWS = 4


def one_graph(layer_loop: str, shape: StepShape) -> bool:
    """Whether a step of this shape runs one graph over all layers (`steps.forward_step`) rather than
    one layer at a time: "model" always, "per_layer" never, "hybrid" for decode and verify steps
    (one token a row) of at most HYBRID_ROWS rows."""
    if layer_loop == "hybrid":
        return shape.T == shape.S <= HYBRID_ROWS and shape.q_block == 1
    return layer_loop == "model"


def bucket(buckets: Sequence[int], n: int, what: str) -> int:
    """The smallest bucket >= n (ValueError naming `what` when none is)."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} {what} exceed the largest bucket {buckets[-1]}; raise the bucket list")
    return buckets[i]


def chunk_pages(chunk, page_size: int) -> int:
    """Pages a chunk's sequence holds once the chunk is computed (its page-table row's length)."""
    return -(-(chunk.start_pos + chunk.num_tokens) // page_size)


def step_shape(rc: RunnerConfig, replicas) -> StepShape:
    """The padded shape of the step that runs the chunks of `replicas` (SchedulerOutputs; with
    data parallelism one shape that fits every replica's chunks: decode-shaped only if every
    replica only decodes)."""
    tokens = [sum(c.num_tokens for c in o.chunks) for o in replicas]
    seqs = [len(o.chunks) for o in replicas]
    pages = max(chunk_pages(c, rc.page_size) for o in replicas for c in o.chunks)
    width = bucket(rc.page_buckets, pages, "pages per sequence")
    if any(c.draft_token_ids for o in replicas for c in o.chunks):  # decodes with drafts
        (out,) = replicas  # (speculative decoding runs on one replica)
        return verify_shape(rc, bucket(rc.seq_buckets, len(out.chunks), "sequences"), width,
                            verify_chunks(out.chunks))
    if tokens == seqs:  # all decodes
        S = bucket(rc.seq_buckets, max(seqs), "sequences")
        if not rc.use_decode_items:  # the kernels (and sequence parallelism): one query row per block
            return StepShape(S, S, width, 1, 0)
        per_item = rc.page_size * rc.pages_per_item
        items = max(sum(-(-(c.start_pos + 1) // per_item) for c in o.chunks) for o in replicas)
        return StepShape(S, S, 1, 1, bucket(rc.item_buckets(S), items, "decode work items"))
    bucket(rc.seq_buckets, max(seqs), "sequences")
    T = bucket(rc.token_buckets, max(tokens), "tokens")
    return StepShape(T, rc.seq_buckets[-1], width, rc.mixed_q_block(T), 0)


def decode_shape(rc: RunnerConfig, num_seqs: int, kv_lens) -> StepShape:
    """The decode-step shape of `num_seqs` one-token rows whose sequences are `kv_lens` long once
    the row is written (the draft model's proposal steps: `inputs.build_draft_inputs`)."""
    S = bucket(rc.seq_buckets, num_seqs, "sequences")
    if not rc.use_decode_items:
        pages = max(-(-n // rc.page_size) for n in kv_lens)
        return StepShape(S, S, bucket(rc.page_buckets, pages, "pages per sequence"), 1, 0)
    per_item = rc.page_size * rc.pages_per_item
    items = sum(-(-n // per_item) for n in kv_lens)
    return StepShape(S, S, 1, 1, bucket(rc.item_buckets(S), items, "decode work items"))


def decode_shapes(rc: RunnerConfig) -> list[StepShape]:
    """Every shape `decode_shape` can return."""
    if rc.use_decode_items:
        return [StepShape(S, S, 1, 1, I) for S in rc.seq_buckets for I in rc.item_buckets(S)]
    return [StepShape(S, S, W, 1, 0) for S in rc.seq_buckets for W in rc.page_buckets]


def verify_chunks(chunks) -> list:
    """A verify step's chunks as one-token decodes: a decode with d drafts at positions p..p+d
    becomes d + 1 decodes of the same request at p, p + 1, ... (the j-th attends to positions
    <= p + j, whose keys the step writes before it reads), so a verify step runs the decode
    path (attention over each sequence's own pages) instead of query blocks over the padded page
    table (on CPU 3.6x a decode step's forward at batch 1, 11x at 8 sequences)."""
    out = []
    for c in chunks:
        real = c.num_tokens - len(c.draft_token_ids)  # (1: a decode)
        for j in range(c.num_tokens):
            drafted = j >= real
            out.append(dataclasses.replace(c, start_pos=c.start_pos + j, num_tokens=1, new_block_ids=(),
                                           samples=c.samples and j == c.num_tokens - 1,
                                           draft_token_ids=(c.draft_token_ids[j - real],) if drafted else ()))
    return out


def verify_seqs(rc: RunnerConfig, S: int) -> int:
    """The one-token rows of a verify step of S sequences (S (1 + K), to a power of two)."""
    n = S * (rc.num_speculative_tokens + 1)
    return 1 << (n - 1).bit_length()


def verify_shape(rc: RunnerConfig, S: int, W: int, rows=None) -> StepShape:
    """A verify step (speculative decoding) of S sequence slots: a decode-shaped step over
    `verify_seqs` one-token rows (`verify_chunks`); `rows`: those chunks (None: the largest
    item bucket, for warm-up)."""
    Sv = verify_seqs(rc, S)
    if not rc.use_decode_items:
        return StepShape(Sv, Sv, W, 1, 0)
    per_item = rc.page_size * rc.pages_per_item
    items = rc.item_buckets(Sv)[-1] if rows is None else sum(-(-(c.start_pos + 1) // per_item) for c in rows)
    return StepShape(Sv, Sv, 1, 1, bucket(rc.item_buckets(Sv), items, "decode work items"))


def all_step_shapes(rc: RunnerConfig) -> list[StepShape]:
    """Every shape `step_shape` can return: what warm-up compiles."""
    shapes = decode_shapes(rc)
    shapes += [StepShape(T, rc.seq_buckets[-1], W, rc.mixed_q_block(T), 0) for T in rc.token_buckets
               for W in rc.page_buckets]
    for S in rc.seq_buckets if rc.num_speculative_tokens else ():  # verify steps' decode shapes
        Sv = verify_seqs(rc, S)
        shapes += [s for s in ([StepShape(Sv, Sv, 1, 1, I) for I in rc.item_buckets(Sv)] if rc.use_decode_items
                               else [StepShape(Sv, Sv, W, 1, 0) for W in rc.page_buckets]) if s not in shapes]
    return shapes
