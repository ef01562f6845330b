"""The producer partitions: the TMA producer warp (K and V pages into the stage ring, and
each block's scales) and, for fp16 P·V, the widener (each stage's INT8 V codes to fp16).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from sageserve.attention.sage_attn.kernels.gluon.config import FP8_MAX, PAGE
from sageserve.attention.sage_attn.kernels.gluon.plan import _item_blocks, _plan_item


@gluon.jit
def _block_slots(table, block, last_page, kv_head, num_kv_heads: gl.constexpr,
                 N: gl.constexpr, layout: gl.constexpr):  # fmt: skip
    """[N] the cache slots (rows of the [P * Hkv * PAGE] scale arrays) of key block `block`'s
    keys, N // PAGE pages of the sequence's table; pages past last_page clamped to it."""
    keys = gl.arange(0, N, layout=layout)
    page = gl.load(table + gl.minimum(block * (N // PAGE) + keys // PAGE, last_page))
    return (page * num_kv_heads + kv_head) * PAGE + keys % PAGE


@gluon.jit
def _prepare_scales(k_scale_ptr, v_scale_ptr, slot, first_key, kv_len, scale_smem, stage,
                    PV_FP8: gl.constexpr):  # fmt: skip
    """One key block's scales for both consumers, into rows 3 * stage .. + 2 of scale_smem
    [3 * STAGES, N] fp32: the K scales, P's per-key factors, and the unit of the block's
    P·V (repeated). slot: [N] the keys' cache slots (`_block_slots`), the keys being
    first_key .. + N - 1 of the sequence; the V scales of keys >= kv_len (stale slots of
    the last page, or a clamped page) are zeroed, so they get factor 0, as in the Triton
    kernel.

    FP8 P·V: factors v_scale * 448 / block_max and unit block_max / 448, block_max being
    the block's largest V scale. (The Triton kernel's diagonal blocks take that max over
    keys < min(kv_len, end of its 64-row block), here over keys < kv_len: the same P up to
    its e4m3 rounding.) fp16 P·V: the factors are the V scales and the unit is 1, as
    `scaled_pv` multiplies P by each key's scale before the fp16 rounding."""
    keys = gl.arange(0, slot.shape[0], layout=slot.type.layout)
    k_scale = gl.load(k_scale_ptr + slot).to(gl.float32)
    v_scale = gl.load(v_scale_ptr + slot).to(gl.float32)
    v_scale = gl.where(first_key + keys < kv_len, v_scale, 0.0)
    scale_smem.index(3 * stage).store(k_scale)
    if PV_FP8:
        block_max = gl.maximum(gl.max(v_scale, axis=0), 2.0**-24)
        scale_smem.index(3 * stage + 1).store(v_scale * (FP8_MAX / block_max))
        scale_smem.index(3 * stage + 2).store(gl.zeros_like(v_scale) + block_max / FP8_MAX)
    else:
        scale_smem.index(3 * stage + 1).store(v_scale)
        scale_smem.index(3 * stage + 2).store(gl.full_like(v_scale, 1.0))


@gluon.jit
def _load_block(k_desc, v_desc, k_smem, v_pages, bar, stage, table, block, last_page, kv_head,
                num_kv_heads: gl.constexpr):  # fmt: skip
    """TMA the N // PAGE pages of key block `block` into stage `stage`: K pages [PAGE, D]
    into consecutive rows of k_smem's stage [N, D], V pages [D, PAGE] into v_pages' slots
    stage * N // PAGE .. (the consumers read them as one [D, N] tile), all on barrier bar."""
    PAGES: gl.constexpr = k_smem.shape[1] // PAGE
    for i in gl.static_range(PAGES):
        page = gl.load(table + gl.minimum(block * PAGES + i, last_page)) * num_kv_heads + kv_head
        tma.async_copy_global_to_shared(k_desc, [page * PAGE, 0], bar,
                                        k_smem.index(stage).slice(i * PAGE, PAGE))  # fmt: skip
        tma.async_copy_global_to_shared(v_desc, [page * v_pages.shape[1], 0], bar,
                                        v_pages.index(stage * PAGES + i))  # fmt: skip


@gluon.jit
def _producer(args, num_q_heads: gl.constexpr, num_kv_heads: gl.constexpr,
              CAUSAL: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """One warp: for every key block of N keys (N // PAGE pages) of the program's work items,
    in order, TMA its K and V pages into stage g % STAGES (g counts the program's blocks
    across its items) once both consumers released block g - STAGES (`_load_block`), then
    the block's scales (`_prepare_scales`). ready[s] completes on the TMA bytes and two
    arrives: the expect's and the one after the scales are stored. `loaded` blocks per item
    (`_item_blocks`); a page past the sequence's last page (the fully masked extra block of
    a short tile, the second half of a last block) is clamped to the last page: page tables
    are padded only to 128 keys. args: the kernel's runtime producer arguments."""
    (k_desc, v_desc, k_smem, v_pages, scale_smem, ready, empty, k_scale_ptr, v_scale_ptr,
     page_table_ptr, stride_table, plan_ptr, q_len_ptr, kv_len_ptr, n_items) = args  # fmt: skip
    N: gl.constexpr = k_smem.shape[1]
    PAGES: gl.constexpr = N // PAGE
    keys_layout: gl.constexpr = gl.BlockedLayout([N // 32], [32], [1], [0])
    nbytes: gl.constexpr = PAGES * (k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        seq, first_row, head, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        _, _, loaded = _item_blocks(q_len, kv_len, first_row, 0, CAUSAL, N)
        kv_head = head // (num_q_heads // num_kv_heads)
        table = page_table_ptr + seq.to(gl.int64) * stride_table
        last_page = (kv_len - 1) // PAGE
        for block in range(loaded):
            g = base + block
            stage = g % STAGES
            mbarrier.wait(empty.index(stage), ((g // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            mbarrier.expect(bar, nbytes)
            _load_block(k_desc, v_desc, k_smem, v_pages, bar, stage, table, block, last_page,
                        kv_head, num_kv_heads)  # fmt: skip
            slot = _block_slots(table, block, last_page, kv_head, num_kv_heads, N, keys_layout)
            _prepare_scales(k_scale_ptr, v_scale_ptr, slot, block * N, kv_len, scale_smem,
                            stage, v_pages.dtype == gl.float8e4nv)  # fmt: skip
            gl.thread_barrier()  # every lane's scales are stored before the one arrive
            mbarrier.arrive(bar, count=1)
        base += loaded


@gluon.jit
def _int8_to_fp16(codes):
    """INT8 codes -> fp16, exactly, 4 at a time without the slow I2F unit (the Triton
    kernel's `_int8_to_fp16`: the bytes, sign-flipped, under an fp16 exponent byte 0x64 give
    1024 + 128 + code; subtract 1152 two lanes at a time)."""
    return gl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, e, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 e, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, e, 0x5140;
        prmt.b32 $1, t, e, 0x5342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r",
        args=[codes],
        dtype=gl.float16,
        is_pure=True,
        pack=4,
    )


@gluon.jit
def _widen_stage(v_smem, v16_smem, stage, slot, WARPS: gl.constexpr):
    """V [D, N] INT8 codes of a stage -> fp16 in v16_smem's slot, 512 * WARPS codes at a
    time (16 codes per thread: 4 registers in, 8 out, within the widener's small register
    budget)."""
    N: gl.constexpr = v_smem.shape[2]
    layout: gl.constexpr = gl.BlockedLayout([1, 16], [512 // N, N // 16], [WARPS, 1], [1, 0])
    rows: gl.constexpr = 512 // N * WARPS
    D: gl.constexpr = v_smem.shape[1]
    src = v_smem.index(stage)
    dst = v16_smem.index(slot)
    for r in gl.static_range(0, D, rows):
        codes = src.slice(r, rows, dim=0).load(layout)
        dst.slice(r, rows, dim=0).store(_int8_to_fp16(codes))


@gluon.jit
def _widener(args, CAUSAL: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
             SLOTS: gl.constexpr):  # fmt: skip
    """FP16 P·V: for every block the producer loads (the same sequence of program blocks g),
    once it landed (`ready`), widen its INT8 V to fp16 (`_widen_stage`) and arrive on
    `widened`, which the consumers wait on for P·V.

    One ring (SLOTS == 0): v16_smem has a slot per K/V stage, and the consumers wait on
    `widened` instead of `ready`. Slot g % STAGES is free by then: the producer reloads a
    stage only after both consumers released its previous block, after their P·V read it.
    Two rings (SLOTS > 0, lab/gluon_ws/selfcheck_two_rings.py): block g goes to slot
    g % SLOTS once both consumers released its previous block (`v_empty`), and the widener
    releases the block's K/V stage (its V read) as a third arrival on `empty`. args: the
    kernel's runtime widener arguments."""
    (v_smem, v16_smem, ready, widened, empty, v_empty, plan_ptr, q_len_ptr, kv_len_ptr,
     n_items) = args  # fmt: skip
    base = 0
    for w in range(gl.program_id(0), n_items, gl.num_programs(0)):
        _, first_row, _, q_len, kv_len = _plan_item(plan_ptr, q_len_ptr, kv_len_ptr, w)
        _, _, loaded = _item_blocks(q_len, kv_len, first_row, 0, CAUSAL, v_smem.shape[2])
        for block in range(loaded):
            g = base + block
            stage = g % STAGES
            mbarrier.wait(ready.index(stage), (g // STAGES) & 1)
            if SLOTS > 0:
                slot = g % SLOTS
                mbarrier.wait(v_empty.index(slot), ((g // SLOTS) & 1) ^ 1)
                _widen_into(v_smem, stage, v16_smem, slot, WARPS)
                mbarrier.arrive(empty.index(stage), count=1)  # this block's V is read
                mbarrier.arrive(widened.index(slot), count=1)
            else:
                _widen_into(v_smem, stage, v16_smem, stage, WARPS)
                mbarrier.arrive(widened.index(stage), count=1)
        base += loaded


@gluon.jit
def _widen_into(v_smem, stage, v16_smem, slot, WARPS: gl.constexpr):
    """Widen stage `stage` of v_smem into slot `slot` of v16_smem, visible to wgmma and to
    every thread before the caller's one arrive."""
    _widen_stage(v_smem, v16_smem, stage, slot, WARPS)
    fence_async_shared()  # each thread's fp16 rows, for wgmma (the async proxy)
    gl.thread_barrier()  # every thread's rows are stored before the one arrive
