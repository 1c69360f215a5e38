"""Where each kept token of each (layer, KV head) lives, and how many blocks that takes.

Vocabulary (DESIGN section 2):

* A *page* is ``block_size`` tokens of one KV head of one layer. The KV cache
  is one buffer ``[num_blocks, L, Hkv, block_size, ...]`` (vLLM's packed,
  block-major layout), so a vLLM block id ``b`` owns the ``L * Hkv``
  consecutive pages ``(b, layer, head)``. :class:`PageSpace` numbers them.
* After compression the heads of a request draw pages from *pools*. With one
  pool for all ``L * Hkv`` heads (cross-layer), every page of every block the
  request holds can serve any head, and the request holds
  ``ceil(sum over heads of pages / (L * Hkv))`` blocks: exact accounting. With
  one pool per layer it holds the maximum over layers instead.
* A pool's pages are numbered by *slots*: slot ``k`` is sub-page
  ``k % pool_size`` of the request's ``k // pool_size``-th block (its *entry*).

:class:`PagePlan` fixes, for one request, the slot of every page of every
head: first each head's compressed tokens, packed head after head; then the
pages that decoding appends. All heads gain one token per step, so they gain
one page per ``block_size`` steps each, at a fixed phase; ordering the new
pages by (step, head) makes each head's decode pages land on one fixed
sub-page of consecutive entries, and the slots in use always form a prefix.
So the block count is a pure function of (compressed counts, tokens appended),
which the scheduler evaluates without hearing from the workers.
"""

from __future__ import annotations

import torch


def cdiv(a, b):
    """Ceiling division for ints and int tensors."""
    return -(-a // b)


def page_slot(prefix_pages, prefix_start, decode_base, pool_size, page):
    """Slot of a head's ``page``: its compressed pages sit at ``prefix_start``
    onwards; each later page takes the next block's sub-page ``decode_base``."""
    return torch.where(page < prefix_pages, prefix_start + page,
                       decode_base + (page - prefix_pages) * pool_size)


class PagePlan:
    """Slots of every page of every head of one compressed request.

    ``counts``: int ``[num_pools, pool_size]``, the tokens each head stores
    when the request is compacted (its kept prompt tokens). Token ``i`` of a
    head (``i >= count`` for tokens appended after compaction) lives at offset
    ``i % block_size`` of that head's page ``i // block_size``.
    """

    def __init__(self, counts: torch.Tensor, block_size: int):
        if counts.ndim != 2 or (counts.device.type == "cpu" and
                                bool((counts < 0).any())):
            raise ValueError("counts must be a non-negative [pools, heads] "
                             "int tensor")
        self.block_size = block_size
        self.counts = counts.to(torch.int64)
        self.num_pools, self.pool_size = counts.shape
        self.prefix_pages = cdiv(self.counts, block_size)
        self.prefix_start = self.prefix_pages.cumsum(-1) - self.prefix_pages
        self.prefix_slots = self.prefix_pages.sum(-1)  # [num_pools]
        # Free room in a head's last compressed page: its first appended page
        # starts after this many appended tokens.
        self.room = self.prefix_pages * block_size - self.counts
        order = torch.sort(self.room, dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order,
                      torch.arange(self.pool_size, device=order.device)
                      .expand_as(order).contiguous())
        self.decode_base = self.prefix_slots[:, None] + rank

    def to(self, device) -> "PagePlan":
        """This plan's tables on ``device`` (copied without a device sync)."""
        moved = object.__new__(PagePlan)
        moved.__dict__.update({
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor)
            else v for k, v in self.__dict__.items()})
        return moved

    def slots(self, pool: torch.Tensor, head: torch.Tensor,
              index: torch.Tensor) -> torch.Tensor:
        """Slot holding token ``index`` of head ``head`` of pool ``pool`` (broadcasting)."""
        return page_slot(self.prefix_pages[pool, head],
                         self.prefix_start[pool, head],
                         self.decode_base[pool, head], self.pool_size,
                         index // self.block_size)

    def num_slots(self, appended: int) -> torch.Tensor:
        """Slots in use per pool once ``appended`` tokens follow the compressed ones."""
        new_pages = cdiv((appended - self.room).clamp(min=0), self.block_size)
        return self.prefix_slots + new_pages.sum(-1)

    def num_blocks(self, appended: int) -> int:
        """Blocks the request holds once ``appended`` tokens follow the compressed ones."""
        return int(cdiv(self.num_slots(appended), self.pool_size).max())

    def num_blocks_many(self, appended: torch.Tensor) -> torch.Tensor:
        """``num_blocks`` for every count of ``appended`` (int ``[A]``) in
        one pass: the scheduler meets a new prompt length with every
        request of a conversation."""
        new_pages = cdiv((appended[:, None, None] - self.room).clamp(min=0),
                         self.block_size)
        slots = self.prefix_slots + new_pages.sum(-1)  # [A, num_pools]
        return cdiv(slots, self.pool_size).amax(-1)


class PageSpace:
    """Page ids of a block-major KV buffer ``[num_blocks, L, Hkv, block_size, E]``.

    Viewing that buffer as ``[num_blocks * L * Hkv, block_size, E]`` gives
    page ``(block, layer, head)`` the id ``(block * L + layer) * Hkv + head``.
    A request's pools cover its ``L * Hkv`` head indices ``layer * Hkv +
    head`` in order, so sub-page ``s`` of pool ``q`` in block ``b`` is page
    ``b * L * Hkv + q * pool_size + s``.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_kv_heads: int,
                 block_size: int):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.pages_per_block = num_layers * num_kv_heads

    def page_id(self, layer, block, head):
        return (block * self.num_layers + layer) * self.num_kv_heads + head

    def slot_page(self, plan: PagePlan, blocks: torch.Tensor,
                  pool: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Page id of ``slot`` of ``pool`` for a request owning ``blocks`` (by entry).

        ``blocks [n, K]`` (n requests of one plan) adds a leading dimension."""
        return (blocks[..., slot // plan.pool_size] * self.pages_per_block +
                pool * plan.pool_size + slot % plan.pool_size)


class RequestLayout:
    """One request's compressed layout: plan, owned blocks, and the rows of its tokens.

    ``counts`` is ``[L, Hkv]``; ``pools`` is 1 (cross-layer pool, exact
    accounting) or L (one pool per layer). ``blocks`` lists the block ids the
    request owns, in entry order. Rows index the buffer viewed as
    ``[pages * block_size, E]``.
    """

    def __init__(self, space: PageSpace, counts: torch.Tensor, pools: int,
                 blocks: torch.Tensor, plan: PagePlan | None = None):
        num_layers, num_kv_heads = counts.shape
        if num_layers * num_kv_heads % pools:
            raise ValueError(f"{num_layers} x {num_kv_heads} heads cannot form "
                             f"{pools} pools")
        self.space = space
        self.plan = plan or PagePlan(counts.reshape(pools, -1), space.block_size)
        self.blocks = blocks.to(torch.int64)

    def _pool_head(self, layer, head):
        flat = layer * self.space.num_kv_heads + head
        return flat // self.plan.pool_size, flat % self.plan.pool_size

    def token_rows(self, layer: torch.Tensor, head: torch.Tensor,
                   index: torch.Tensor) -> torch.Tensor:
        """Rows of token ``index`` of (layer, head), after compaction (broadcasting)."""
        pool, pool_head = self._pool_head(layer, head)
        slot = self.plan.slots(pool, pool_head, index)
        page = self.space.slot_page(self.plan, self.blocks, pool, slot)
        return page * self.space.block_size + index % self.space.block_size

    def page_table(self, layer: int, num_tokens: torch.Tensor) -> torch.Tensor:
        """Page ids ``[Hkv, max_pages]`` of each head of ``layer`` holding ``num_tokens[h]`` tokens.

        Unused entries are 0 (never read: attention stops at the head's length).
        """
        device = self.blocks.device
        num_pages = cdiv(num_tokens.to(device), self.space.block_size)
        width = max(int(num_pages.max()), 1)
        head = torch.arange(self.space.num_kv_heads, device=device)[:, None]
        page = torch.arange(width, device=device)[None, :]
        pool, pool_head = self._pool_head(layer, head)
        slot = self.plan.slots(pool, pool_head, page * self.space.block_size)
        used = page < num_pages[:, None]
        slot = torch.where(used, slot, 0)
        return torch.where(used,
                           self.space.slot_page(self.plan, self.blocks, pool,
                                                slot), 0)


def prompt_rows(space: PageSpace, prompt_blocks: torch.Tensor, layer, head,
                position) -> torch.Tensor:
    """Rows of prompt token ``position`` of (layer, head) in vLLM's standard layout.

    Before compaction a request's token at position p sits in its
    ``p // block_size``-th block at offset ``p % block_size``, in every head.
    ``prompt_blocks`` may carry leading batch dimensions (one row per request).
    """
    return standard_row(space, prompt_blocks[..., position // space.block_size],
                        layer, head, position)


def standard_row(space: PageSpace, block: torch.Tensor, layer, head,
                 position) -> torch.Tensor:
    """Row of ``position`` of (layer, head) once its block id is known."""
    return (space.page_id(layer, block, head) * space.block_size +
            position % space.block_size)


class CompactionMoves:
    """A plan's compaction, whatever the request: row ``r`` moves kept token
    ``index[r]`` of flat head ``flat[r]`` (``layer * Hkv + head``) to row
    ``sub[r]`` of the request's fresh block ``entry[r]`` (int32 each, so the
    engine can keep them per plan)."""

    def __init__(self, space: PageSpace, plan: PagePlan, counts: torch.Tensor,
                 num_blocks: int, total: int | None = None):
        """``counts``: the tokens each head moves (``[L, Hkv]``, the kept ones
        and any appended after them); ``total`` their sum, when the host
        knows it (else a device sync); ``num_blocks`` fresh blocks."""
        device = counts.device
        shape = counts.view(space.num_layers, -1)
        counts = counts.flatten()
        if total is None:
            total = int(counts.sum())
        flat = torch.repeat_interleave(
            torch.arange(len(counts), device=device), counts,
            output_size=total)
        first = counts.cumsum(0) - counts
        index = torch.arange(total, device=device) - first[flat]
        # the layout over fresh blocks 0 .. num_blocks - 1: block id = entry
        layout = RequestLayout(space, shape, plan.num_pools, torch.arange(
            num_blocks, device=device), plan=plan)
        rows = layout.token_rows(flat // space.num_kv_heads,
                                 flat % space.num_kv_heads, index)
        per_block = space.pages_per_block * space.block_size
        self.space = space
        self.flat, self.index, self.entry, self.sub = (
            t.to(torch.int32) for t in
            (flat, index, rows // per_block, rows % per_block))

    @property
    def nbytes(self) -> int:
        return 4 * 4 * self.flat.numel()

    def rows(self, prompt_blocks: torch.Tensor, positions: torch.Tensor,
             fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and destination rows ``[n, total]`` of n requests:
        ``prompt_blocks [n, columns]``, kept ``positions [n, L, Hkv, width]``
        (ascending, padded with -1) and ``fresh`` blocks ``[n, num_blocks]``.
        Sources and destinations overlap: move through a copy."""
        space = self.space
        n, width = positions.shape[0], positions.shape[-1]
        kept = positions.reshape(n, -1, width)[:, self.flat, self.index]
        block = prompt_blocks.gather(1, (kept // space.block_size).long())
        src = standard_row(space, block, self.flat // space.num_kv_heads,
                           self.flat % space.num_kv_heads, kept)
        per_block = space.pages_per_block * space.block_size
        dst = fresh.gather(1, self.entry.long().expand(n, -1)) * per_block
        return src, dst + self.sub


def compaction_rows(layout: RequestLayout, prompt_blocks: torch.Tensor,
                    positions: torch.Tensor, counts: torch.Tensor,
                    total: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination rows that pack every head's kept tokens into its pages.

    ``positions``: ``[L, Hkv, max_kept]`` kept positions (ascending, padded
    with -1) and ``counts``: ``[L, Hkv]``, as :func:`select_kept` returns them
    per layer. ``total`` (``counts.sum()``, known on the host) keeps the
    device from syncing. Sources and destinations overlap: move through a copy.
    Requests that share one plan move together: positions ``[n, L, Hkv,
    max_kept]``, ``prompt_blocks [n, columns]`` and the layout's blocks
    ``[n, K]`` give rows ``[n, total]``.
    """
    single = positions.ndim == 3
    if single:
        positions, prompt_blocks = positions[None], prompt_blocks[None]
    blocks = layout.blocks.view(-1, layout.blocks.shape[-1])
    moves = CompactionMoves(layout.space, layout.plan,
                            counts.to(positions.device), blocks.shape[-1],
                            total)
    src, dst = moves.rows(prompt_blocks, positions,
                          blocks.expand(positions.shape[0], -1))
    return (src[0], dst[0]) if single else (src, dst)
