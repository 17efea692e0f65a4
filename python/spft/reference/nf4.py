"""Reference for 4-bit NF4/FP4 blockwise quantisation in the bitsandbytes format.

Format (the same bytes as `bitsandbytes.functional.quantize_4bit` on its CPU/default backend):

* The weight is flattened row-major and cut into blocks of `blocksize` elements (32 … 4096,
  a power of two); the last block may be shorter. Each block keeps its fp32 absmax.
* Each element is scaled into [-1, 1] (full blocks: `x * (1 / absmax)`; the short tail block:
  `x / absmax`, absmax clamped to ≥ 1e-38 first, as bnb does) and mapped to the nearest of the 16
  code values (ties go to the lower code). Codes are packed two per byte, the even element in
  the high nibble; an odd element count pads the last low nibble with the code of 0.0.
* Double quantisation (bnb's `compress_statistics=True`): `offset = mean(absmax)`, then
  `absmax - offset` is quantised 8-bit blockwise (blocks of 256) against the signed dynamic map,
  keeping one fp32 absmax per 256 blocks. Dequantised: `code2[q] * absmax2 + offset`, rounded to
  fp32 after the product and again after the sum (no fused multiply-add).
* Dequantisation: `code[q] * absmax` in fp32, rounded once to the output dtype.
"""

from __future__ import annotations

import functools

import torch

NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
FP4_CODE = (
    0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408, 0.5,
    0.1666666716337204, 0.25, 0.0, -0.0052083334885537624, -0.6666666865348816, -1.0,
    -0.3333333432674408, -0.5, -0.1666666716337204, -0.25,
)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # blocks of the double-quantised absmax (bnb's fixed choice)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE, dtype=torch.float32)


def code_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 fp32 code values of `quant_type` ("nf4" or "fp4")."""
    return _code_cpu(quant_type).to(device)


@functools.cache
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.argsort(code)  # computed once on the CPU: FP4's two zeros keep one order
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


def quantize_bounds(quant_type: str, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints [15] fp32 between the sorted codes, order [16] uint8 sorted → code index)."""
    mids, order = _bounds_cpu(quant_type)
    return mids.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bnb's signed dynamic 8-bit map (7 exponent bits): per decade 10^(i-6), the midpoints of a
    # linear grid on [0.1, 1] with 2^i + 1 points, mirrored for the sign, plus 0 and 1.
    values: list[float] = []
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (grid[:-1] + grid[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()  # fp32 products
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 values of the signed 8-bit dynamic map used for the absmax."""
    return _dynamic_map_cpu().to(device)


# --------------------------------------------------------------------------- 4-bit
def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the elements scaled into [-1, 1] (fp32), bnb's exact arithmetic."""
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_empty(0)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (body * inv[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return absmax, scaled


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantisation of any-shaped `w` (bf16/fp16/fp32, read row-major).

    Returns (packed [ceil(numel / 2)] uint8, absmax [ceil(numel / blocksize)] fp32).
    """
    flat = w.reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    mids, order = quantize_bounds(quant_type, flat.device)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # pads with the code of 0.0
    q = torch.bucketize(scaled, mids)  # ties at a midpoint go to the lower code
    q = order.long()[q].to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                    blocksize: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Flat [numel] `dtype` values `code[q] * absmax[block]` (fp32 product, one rounding)."""
    q = unpack_codes(packed, numel).long()
    blocks = torch.arange(numel, device=packed.device) // blocksize
    return (code.float()[q] * absmax.float()[blocks]).to(dtype)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The [numel] uint8 codes (0..15) of `packed`: element e is in byte e // 2, the high nibble
    for even e and the low nibble for odd e."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]


# --------------------------------------------------------------------------- 8-bit absmax
def quantize_blockwise_8bit(a: torch.Tensor, code: torch.Tensor,
                            blocksize: int = ABSMAX_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU blockwise 8-bit quantisation of fp32 `a` [n]: per block of `blocksize`,
    `a / absmax` (a true division) mapped to the nearest of the 256 sorted `code` values, ties
    to the lower one. Returns (q [n] uint8, absmax [ceil(n / blocksize)] fp32)."""
    a = a.reshape(-1).float()
    n = a.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(a, (0, n_blocks * blocksize - n))
    absmax = padded.view(n_blocks, blocksize).abs().amax(dim=1)
    blocks = torch.arange(n, device=a.device) // blocksize
    scale = absmax[blocks]
    normed = torch.where(scale > 0, a / torch.where(scale > 0, scale, 1.0), 0.0)
    code = code.float().clone()
    code[0] = -1.0  # bnb widens the first code so every value in [-1, 1] has a left neighbour
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 2)
    dist_left = (normed - code[left]).abs()
    dist_right = (normed - code[left + 1]).abs()
    q = left + (dist_right < dist_left).long()
    return q.to(torch.uint8), absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor]:
    """bnb's `compress_statistics`: returns (qabsmax uint8 [nb], absmax2 fp32 [ceil(nb/256)],
    code2 fp32 [256], offset fp32 0-dim)."""
    offset = absmax.float().mean()
    code2 = dynamic_map(absmax.device)
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax.float() - offset, code2)
    return qabsmax, absmax2, code2, offset


def dequantize_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                      offset: torch.Tensor, blocksize2: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """fp32 absmax from its 8-bit form: round(round(code2[q] * absmax2[b // 256]) + offset)."""
    q = qabsmax.reshape(-1).long()
    blocks = torch.arange(q.numel(), device=q.device) // blocksize2
    return code2.float()[q] * absmax2.float()[blocks] + offset.float()


# --------------------------------------------------------------------------- with deltas
def dequantize_scatter(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                       blocksize: int, shape: tuple[int, int], dtype: torch.dtype,
                       dv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`W + scatter(dv, idx)` with W the dequantised weight in `dtype` (fp32 absmax):
    W'[i] = round(float(W[i]) + dv[i]), everything else equal to W. Shape `shape`."""
    w = dequantize_4bit(packed, absmax, code, blocksize, shape[0] * shape[1], dtype)
    return add_deltas(w, dv, idx).view(shape)


def add_deltas(w: torch.Tensor, dv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`w + scatter(dv, idx)` in w's dtype and shape, w'[i] = round(float(w[i]) + dv[i]): the sum
    in fp32 (fp64 when w or dv is fp64), rounded once. idx: [k] flat indices into w."""
    acc = torch.float64 if torch.float64 in (w.dtype, dv.dtype) else torch.float32
    flat = w.reshape(-1).to(acc).index_add(0, idx.long(), dv.to(acc))
    return flat.to(w.dtype).view(w.shape)


# --------------------------------------------------------------------------- GEMV serving layout
GEMV_GROUP = 64  # inputs per group: one absmax each, 16 rows × 64 inputs per tile
GEMV_TILE_ROWS = 16


def pack_gemv_tiles(codes_nk: torch.Tensor, absmax_rg: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack 4-bit codes into the tile-major layout the compiled small-batch kernel reads.

    Args:
        codes_nk: [N, K] uint8 codes 0..15 (K a multiple of 64).
        absmax_rg: [N, K // 64] fp32, the absmax of each run of 64 inputs of a row.
    Returns (codes [Tn, G, 32, 16] uint8, absmax [Tn, G, 8, 2] fp32), both contiguous, with
    Tn = ceil(N / 16), G = K // 64; rows N..16·Tn-1 are padding (code 0, absmax 0.0).

    Layout: lane L = 4g + t (g 0..7, t 0..3) of tile `tile`, group `grp` owns 16 bytes, read as
    4 little-endian 32-bit words s = 0..3. Nibble i (bits 4i..4i+3) of word s holds the code of
    row tile·16 + g + 8h, input grp·64 + 16t + 4s + j, where i = 4·(j // 2) + 2h + j % 2
    (h 0..1, j 0..3). absmax[tile, grp, g, h] is the absmax of that row in group grp.
    """
    n, k = codes_nk.shape
    if k % GEMV_GROUP:
        raise ValueError(f"in_features={k} is not a multiple of {GEMV_GROUP}")
    if absmax_rg.shape != (n, k // GEMV_GROUP):
        raise ValueError(f"absmax_rg must have shape ({n}, {k // GEMV_GROUP}), got "
                         f"{tuple(absmax_rg.shape)}")
    groups, tiles = k // GEMV_GROUP, -(-n // GEMV_TILE_ROWS)
    pad = tiles * GEMV_TILE_ROWS - n
    c = torch.cat([codes_nk.to(torch.uint8), codes_nk.new_zeros(pad, k, dtype=torch.uint8)])
    # [tile, h, g, grp, t, s, jh, jl] -> [tile, grp, g, t, s, jh, h, jl]; j = 2·jh + jl.
    c = c.view(tiles, 2, 8, groups, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 6, 1, 7)
    c = c.reshape(tiles, groups, 32, 16, 2)
    codes = c[..., 0] | (c[..., 1] << 4)
    a = torch.cat([absmax_rg.float(), absmax_rg.new_zeros(pad, groups, dtype=torch.float32)])
    absmax = a.view(tiles, 2, 8, groups).permute(0, 3, 2, 1).contiguous()
    return codes.contiguous(), absmax


def unpack_gemv_tiles(codes: torch.Tensor, absmax: torch.Tensor, out_features: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_gemv_tiles`: (codes_nk [N, K] uint8, absmax_rg [N, K // 64] fp32)
    from codes [Tn, G, 32, 16] uint8 and absmax [Tn, G, 8, 2] fp32, padding rows dropped
    (N = out_features, K = 64·G)."""
    tiles, groups = codes.shape[:2]
    if codes.shape != (tiles, groups, 32, 16) or absmax.shape != (tiles, groups, 8, 2):
        raise ValueError(f"codes must be [Tn, G, 32, 16] and absmax [Tn, G, 8, 2], got "
                         f"{tuple(codes.shape)} and {tuple(absmax.shape)}")
    if not (tiles - 1) * GEMV_TILE_ROWS < out_features <= tiles * GEMV_TILE_ROWS:
        raise ValueError(f"out_features={out_features} does not fill {tiles} tiles of "
                         f"{GEMV_TILE_ROWS} rows")
    rows, k = tiles * GEMV_TILE_ROWS, groups * GEMV_GROUP
    c = torch.stack([codes & 0xF, codes >> 4], dim=-1)
    # [tile, grp, g, t, s, jh, h, jl] -> [tile, h, g, grp, t, s, jh, jl]
    c = c.view(tiles, groups, 8, 4, 4, 2, 2, 2).permute(0, 6, 2, 1, 3, 4, 5, 7)
    codes_nk = c.reshape(rows, k)[:out_features]
    absmax_rg = absmax.permute(0, 3, 2, 1).reshape(rows, groups)[:out_features]
    return codes_nk, absmax_rg
