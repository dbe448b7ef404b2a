/* Fused elementwise passes of the merges (loaded by native.py).

   Each function does in one pass over memory what the numpy/torch path does in
   several. They must give the same bits: the library is compiled without
   floating-point contraction or fast-math, so every float operation rounds once,
   as IEEE single precision says, in the order written here, which is the order
   of the passes they replace. Integer work (keys, masks, counts) is exact.

   Value kinds: 0 float32, 1 bfloat16, 2 float16. 16-bit values convert to float32
   exactly. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* Some loops have a second, AVX-512 copy on x86-64 with GCC or Clang (intrinsics in
   functions compiled for those instructions), which the CPU picks at run time where it has
   them; MERGEBUILD_NATIVE_AVX512=0 keeps to the portable loops, and the tests compare the
   two. Both copies give the same bits: their integer work is exact, and their float
   operations are the portable loop's, in its order, each rounded once. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WIDE __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512vbmi2,popcnt")))
static int wide(void) {
    static int answer = -1; /* a benign race: every thread finds the same */
    if (answer < 0) {
        const char *setting = getenv("MERGEBUILD_NATIVE_AVX512");
        answer = !(setting && strcmp(setting, "0") == 0) && __builtin_cpu_supports("avx512f") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
                 __builtin_cpu_supports("popcnt");
    }
    return answer;
}
#define HAVE_WIDE 1
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline int32_t bits_of(float f) {
    int32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0x1F) return from_bits(sign | 0x7F800000 | (mantissa << 13));
    if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f; /* exact: a subnormal half */
        return sign ? -magnitude : magnitude;
    }
    return from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

static inline __attribute__((always_inline)) float load(const void *p, int kind, i64 j) {
    if (kind == BF16) return from_bits((uint32_t)((const uint16_t *)p)[j] << 16);
    if (kind == F16) return half_to_float(((const uint16_t *)p)[j]);
    return ((const float *)p)[j];
}

/* Calls BODY with the two kinds as constants, so each pairing gets its own loop. */
#define BY_KINDS(ka, kb, BODY)                       \
    switch ((ka) * 3 + (kb)) {                       \
        case 0: BODY(F32, F32); break;               \
        case 1: BODY(F32, BF16); break;              \
        case 2: BODY(F32, F16); break;               \
        case 3: BODY(BF16, F32); break;              \
        case 4: BODY(BF16, BF16); break;             \
        case 5: BODY(BF16, F16); break;              \
        case 6: BODY(F16, F32); break;               \
        case 7: BODY(F16, BF16); break;              \
        default: BODY(F16, F16); break;              \
    }

/* out = a - b, in float32. */
void mb_difference(i64 n, const void *a, int ka, const void *b, int kb, float *restrict out) {
#define DIFFERENCE(KA, KB) \
    for (i64 j = 0; j < n; j++) out[j] = load(a, KA, j) - load(b, KB, j);
    BY_KINDS(ka, kb, DIFFERENCE)
#undef DIFFERENCE
}

/* The weighted kept delta of one element: ((e - b) * keep) * factor * weight, keep 0 or 1
   (a dropped infinite difference gives NaN, as the torch path's product does). Without a
   rescale factor the callers pass 1, and x * 1 is x. */
static inline __attribute__((always_inline)) float kept_weighted(
    const void *e, int ke, const void *b, int kb, const uint8_t *mask, float factor, float weight, i64 j) {
    return (load(e, ke, j) - load(b, kb, j)) * (float)mask[j] * factor * weight;
}

/* Without consensus: total = x + 0 for the first model (IEEE: -0 becomes +0), else total + x. */
static void fold_total(i64 n, const void *e, int ke, const void *b, int kb, const uint8_t *restrict mask,
                       const float *factor, float weight, float *restrict total, int first) {
    const float scale = factor ? *factor : 1.0f;
#define FOLD_TOTAL(KE, KB)                                                            \
    if (first)                                                                        \
        for (i64 j = 0; j < n; j++)                                                   \
            total[j] = kept_weighted(e, KE, b, KB, mask, scale, weight, j) + 0.0f;    \
    else                                                                              \
        for (i64 j = 0; j < n; j++)                                                   \
            total[j] = total[j] + kept_weighted(e, KE, b, KB, mask, scale, weight, j);
    BY_KINDS(ke, kb, FOLD_TOTAL)
#undef FOLD_TOTAL
}

/* x where `keep`, else +0 (a NaN is kept wherever a comparison keeps it). Bit operations, not
   a conditional: gcc turns `(c ? 0 : x) + 0` into a branch, and then vectorizes nothing. */
static inline __attribute__((always_inline)) float kept_if(float x, int keep) {
    return from_bits((uint32_t)bits_of(x) & -(uint32_t)keep);
}

/* One model folded into the signed sums (x > 0 into pos, x < 0 into neg, NaN into both, as
   torch.clamp gives them); WORD: the bit sets' type. */
#define SIGNED_LOOP(KE, KB, FIRST, WORD, HAS_BITS)                                   \
    for (i64 j = 0; j < n; j++) {                                                    \
        float x = kept_weighted(e, KE, b, KB, mask, scale, weight, j);               \
        if (HAS_BITS) {                                                              \
            /* A product, not a conditional: gcc vectorizes only this form. */          \
            ((WORD *)pos_bits)[j] |= (WORD)((x > 0.0f) * bit);                       \
            ((WORD *)neg_bits)[j] |= (WORD)((x < 0.0f) * bit);                       \
        }                                                                            \
        float up = kept_if(x, !(x < 0.0f)), down = kept_if(x, !(x > 0.0f));         \
        pos[j] = (FIRST ? 0.0f : pos[j]) + up;                                       \
        neg[j] = (FIRST ? 0.0f : neg[j]) + down;                                     \
    }
#define SIGNED_FIRST(KE, KB, WORD, HAS_BITS)  \
    if (first) {                              \
        SIGNED_LOOP(KE, KB, 1, WORD, HAS_BITS) \
    } else {                                  \
        SIGNED_LOOP(KE, KB, 0, WORD, HAS_BITS) \
    }
#define SIGNED_8(KE, KB) SIGNED_FIRST(KE, KB, uint8_t, 1)
#define SIGNED_32(KE, KB) SIGNED_FIRST(KE, KB, uint32_t, 1)
#define SIGNED_NONE(KE, KB) SIGNED_FIRST(KE, KB, uint8_t, 0)

/* With consensus: the positive and the negative parts of x summed apart (a NaN goes into
   both; the first model's parts plus 0, which 0 + part is too); with `pos_bits` (then
   `neg_bits` too), bit `bit` is set where x is positive (or negative), in bit sets of
   `width` bytes (1 or 4). */
static void fold_signed(i64 n, const void *e, int ke, const void *b, int kb, const uint8_t *restrict mask,
                        const float *factor, float weight, float *restrict pos, float *restrict neg, int first,
                        void *restrict pos_bits, void *restrict neg_bits, int width, uint32_t bit) {
    const float scale = factor ? *factor : 1.0f;
    if (!pos_bits) {
        BY_KINDS(ke, kb, SIGNED_NONE)
    } else if (width == 4) {
        BY_KINDS(ke, kb, SIGNED_32)
    } else {
        BY_KINDS(ke, kb, SIGNED_8)
    }
}
#undef SIGNED_8
#undef SIGNED_32
#undef SIGNED_NONE
#undef SIGNED_FIRST
#undef SIGNED_LOOP

/* Several models folded in at once (fold_total or fold_signed, each model in turn), a
   tile at a time: a tile of the sums stays in the CPU's cache from one model's pass to the
   next, so the sums cross memory once per group instead of once per model. Each element
   still takes the models in order: the bits are those of one fold per model. */
enum { FOLD_TILE = 1 << 13 };

static inline i64 kind_bytes(int kind) { return kind == F32 ? 4 : 2; }

/* One model of a group: its weighted kept delta's operands (see kept_weighted). */
typedef struct {
    const void *expert;
    const uint8_t *mask;
    const float *factor; /* NULL: no rescale */
    float weight;
    int kind;
    uint32_t bit; /* its bit in the bit sets (fold_signed) */
} FoldModel;

void mb_fold_total_group(i64 n, int count, const FoldModel *models, const void *b, int kb, float *restrict total,
                         int first) {
    for (i64 lo = 0; lo < n; lo += FOLD_TILE) {
        i64 m = n - lo < FOLD_TILE ? n - lo : FOLD_TILE;
        for (int i = 0; i < count; i++) {
            const FoldModel *model = &models[i];
            fold_total(m, (const char *)model->expert + lo * kind_bytes(model->kind), model->kind,
                       (const char *)b + lo * kind_bytes(kb), kb, model->mask + lo, model->factor, model->weight,
                       total + lo, first && i == 0);
        }
    }
}

void mb_fold_signed_group(i64 n, int count, const FoldModel *models, const void *b, int kb, float *restrict pos,
                          float *restrict neg, int first, void *pos_bits, void *neg_bits, int width) {
    for (i64 lo = 0; lo < n; lo += FOLD_TILE) {
        i64 m = n - lo < FOLD_TILE ? n - lo : FOLD_TILE;
        for (int i = 0; i < count; i++) {
            const FoldModel *model = &models[i];
            fold_signed(m, (const char *)model->expert + lo * kind_bytes(model->kind), model->kind,
                        (const char *)b + lo * kind_bytes(kb), kb, model->mask + lo, model->factor, model->weight,
                        pos + lo, neg + lo, first && i == 0, pos_bits ? (char *)pos_bits + lo * width : NULL,
                        neg_bits ? (char *)neg_bits + lo * width : NULL, width, model->bit);
        }
    }
}

/* The finish of one element of the mix: divided by its divisor, times lambda, plus the base
   (the callers pass 1 for an absent divisor or lambda: x / 1 and x * 1 are x). */
static inline __attribute__((always_inline)) float finished(float mixed, float divisor, float lam,
                                                             const void *base, int kb, i64 j) {
    return mixed / divisor * lam + load(base, kb, j);
}

/* The merged values of a mix without consensus, over `total`; `divisor` is the one divisor
   of every element (NULL: none). */
void mb_finish_total(i64 n, float *restrict total, const float *divisor, const float *lam, const void *base,
                     int kb) {
    const float by = divisor ? *divisor : 1.0f, times = lam ? *lam : 1.0f;
#define FINISH_TOTAL(KB) \
    for (i64 j = 0; j < n; j++) total[j] = finished(total[j], by, times, base, KB, j);
    switch (kb) {
        case F32: FINISH_TOTAL(F32); break;
        case BF16: FINISH_TOTAL(BF16); break;
        default: FINISH_TOTAL(F16); break;
    }
#undef FINISH_TOTAL
}

/* The merged values of a consensus mix, over `pos`: the elected sign is that of pos + neg (0
   counting as positive; NaN as negative), and picks the positive or the negative sum. With
   `table`, the divisor is the table's entry for the elected side's bit set (`width` bytes);
   otherwise `divisor` (NULL: none). */
void mb_finish_signed(i64 n, float *restrict pos, const float *restrict neg, const void *pos_bits,
                      const void *neg_bits, int width, const float *table, const float *divisor,
                      const float *lam, const void *base, int kb) {
    const float by = divisor ? *divisor : 1.0f, times = lam ? *lam : 1.0f;
#define FINISH_SIGNED(KB, WORD, HAS_TABLE)                                                 \
    for (i64 j = 0; j < n; j++) {                                                          \
        WORD elected = pos[j] + neg[j] >= 0.0f;                                            \
        float mixed = elected ? pos[j] : neg[j];                                           \
        if (HAS_TABLE) {                                                                   \
            /* The elected side's bit set, picked without a branch (it would mispredict). */ \
            WORD up = ((const WORD *)pos_bits)[j], down = ((const WORD *)neg_bits)[j];     \
            pos[j] = finished(mixed, table[down ^ ((up ^ down) & -elected)], times, base, KB, j); \
        } else {                                                                           \
            pos[j] = finished(mixed, by, times, base, KB, j);                              \
        }                                                                                  \
    }
#define FINISH_SIGNED_BY_BASE(WORD, HAS_TABLE)                   \
    switch (kb) {                                                \
        case F32: FINISH_SIGNED(F32, WORD, HAS_TABLE); break;    \
        case BF16: FINISH_SIGNED(BF16, WORD, HAS_TABLE); break;  \
        default: FINISH_SIGNED(F16, WORD, HAS_TABLE); break;     \
    }
    if (!table) {
        FINISH_SIGNED_BY_BASE(uint8_t, 0)
    } else if (width == 4) {
        FINISH_SIGNED_BY_BASE(uint32_t, 1)
    } else {
        FINISH_SIGNED_BY_BASE(uint8_t, 1)
    }
#undef FINISH_SIGNED_BY_BASE
#undef FINISH_SIGNED
}

/* The int32 key of a float32 value: ordered like |x| (`absolute`) or like x (+m for x >= 0,
   -m for x < 0, m the bit pattern of |x|: -0 and +0 share the key 0). */
static inline __attribute__((always_inline)) int32_t key_of(float x, int absolute) {
    int32_t bits = bits_of(x), magnitude = bits & 0x7FFFFFFF;
    if (absolute) return magnitude;
    return bits < 0 ? -magnitude : magnitude;
}

/* The mask of one block and its counts (see mb_bracket_block), with ABS and COUNTS as constants:
   branch-free, so it vectorizes. */
#define MASK_LOOP(ABS, COUNTS)                                                     \
    for (i64 j = 0; j < n; j++) {                                                  \
        int32_t key = key_of(values[j], ABS);                                      \
        mask[j] = (!has_above | (key > above)) & (!has_beneath | (key < beneath)); \
        if (COUNTS > 0) c0 += key >= t0;                                           \
        if (COUNTS > 1) c1 += key >= t1;                                           \
        if (COUNTS > 2) c2 += key >= t2;                                           \
        if (COUNTS > 3) c3 += key >= t3;                                           \
    }

/* The keys of one block inside [low, high], to `keys` with their offsets to `at`, in order;
   returns how many. Every element is written, and kept only by advancing the count: no
   branch to mispredict. */
static inline __attribute__((always_inline)) i64 gather(i64 n, const float *restrict values, int absolute,
                                                        int32_t low, int32_t high, int32_t *restrict at,
                                                        int32_t *restrict keys) {
    i64 inside = 0;
    for (i64 j = 0; j < n; j++) {
        int32_t key = key_of(values[j], absolute);
        at[inside] = (int32_t)j;
        keys[inside] = key;
        inside += (key >= low) & (key <= high);
    }
    return inside;
}

/* One block of the bracketing pass (sparsify._bracketed_mask): for the keys of `values`,
   mask[j] = key > above (when has_above) and key < beneath (when has_beneath);
   counted[t] += how many keys are >= thresholds[t], for each of `count` (0 to 4)
   thresholds; and for each of `ranges` (0 to 2) key ranges [lo[r], hi[r]], the keys inside
   go to keys_r with their offsets in the block to at_r, in order, found[r] of them. */
void mb_bracket_block(i64 n, const float *restrict values, int absolute, int has_above, int32_t above,
                      int has_beneath, int32_t beneath, uint8_t *restrict mask, int count,
                      const int32_t *thresholds, i64 *restrict counted, int ranges, const int32_t *lo,
                      const int32_t *hi, int32_t *restrict at_0, int32_t *restrict keys_0,
                      int32_t *restrict at_1, int32_t *restrict keys_1, i64 *restrict found) {
    const int32_t t0 = count > 0 ? thresholds[0] : 0, t1 = count > 1 ? thresholds[1] : 0;
    const int32_t t2 = count > 2 ? thresholds[2] : 0, t3 = count > 3 ? thresholds[3] : 0;
    /* Per block (at most 2^31 elements), so 32-bit counters, which vectorize better. */
    int32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    switch (absolute * 5 + count) {
        case 0: MASK_LOOP(0, 0); break;
        case 1: MASK_LOOP(0, 1); break;
        case 2: MASK_LOOP(0, 2); break;
        case 3: MASK_LOOP(0, 3); break;
        case 4: MASK_LOOP(0, 4); break;
        case 5: MASK_LOOP(1, 0); break;
        case 6: MASK_LOOP(1, 1); break;
        case 7: MASK_LOOP(1, 2); break;
        case 8: MASK_LOOP(1, 3); break;
        default: MASK_LOOP(1, 4); break;
    }
    const int32_t totals[4] = {c0, c1, c2, c3};
    for (int t = 0; t < count; t++) counted[t] += totals[t];
    for (int r = 0; r < ranges; r++) {
        int32_t *at = r ? at_1 : at_0, *keys = r ? keys_1 : keys_0;
        found[r] = absolute ? gather(n, values, 1, lo[r], hi[r], at, keys)
                            : gather(n, values, 0, lo[r], hi[r], at, keys);
    }
}
#undef MASK_LOOP

/* One chunk of a 2-byte sparse delta blob (sparse_delta.encode): the mask packed most
   significant bit first (the last byte padded with zeros); per kept element the wrapping
   difference of its bit pattern from the base's as a byte, or -128 when it does not fit in
   -127 .. 127, the bit pattern then going to `escaped`. Sets *kept_count and returns how
   many escaped; `codes` and `escaped` hold one more element than are kept (the last is
   scratch). */
static i64 encode_16(i64 n, const uint8_t *restrict mask, const int16_t *restrict expert,
                     const int16_t *restrict base, uint8_t *restrict packed, int8_t *restrict codes,
                     int16_t *restrict escaped, i64 *kept_count) {
    /* Eight mask bytes (each 0 or 1) at once: the product puts byte k's bit at bit 63 - k,
       every other partial product lands below bit 56, and no two share a bit (no carries). */
    i64 full = n / 8;
    for (i64 byte = 0; byte < full; byte++) {
        uint64_t word;
        memcpy(&word, mask + 8 * byte, sizeof word);
        packed[byte] = (uint8_t)((word * 0x8040201008040201ULL) >> 56);
    }
    if (n % 8) {
        uint8_t bits = 0;
        for (i64 j = 8 * full; j < n; j++) bits |= (uint8_t)(mask[j] << (7 - (j - 8 * full)));
        packed[full] = bits;
    }
    /* Per piece: every element's code in one vectorized pass, then the kept codes and the
       escaped bit patterns gathered without branches (each element is written, and kept only
       by advancing the count: a branch on a random mask would mispredict often). */
    enum { PIECE = 4096 };
    int8_t piece_codes[PIECE];
    i64 kept = 0, outside = 0;
    for (i64 lo = 0; lo < n; lo += PIECE) {
        i64 m = n - lo < PIECE ? n - lo : PIECE;
        const uint8_t *in = mask + lo;
        const int16_t *e = expert + lo, *b = base + lo;
        for (i64 j = 0; j < m; j++) {
            int16_t diff = (int16_t)(uint16_t)((uint16_t)e[j] - (uint16_t)b[j]);
            piece_codes[j] = diff >= -127 && diff <= 127 ? (int8_t)diff : -128;
        }
        for (i64 j = 0; j < m; j++) {
            codes[kept] = piece_codes[j];
            kept += in[j];
        }
        /* Escapes are rare (a sign or binade that changed): eight codes at once are skipped
           when none of them is -128 (0x80), found as a zero byte of their xor with 0x80s. */
        i64 j = 0;
        for (; j + 8 <= m; j += 8) {
            uint64_t group;
            memcpy(&group, piece_codes + j, sizeof group);
            group ^= 0x8080808080808080ULL;
            if (!((group - 0x0101010101010101ULL) & ~group & 0x8080808080808080ULL)) continue;
            for (i64 k = j; k < j + 8; k++) {
                escaped[outside] = e[k];
                outside += in[k] & (piece_codes[k] == -128);
            }
        }
        for (; j < m; j++) {
            escaped[outside] = e[j];
            outside += in[j] & (piece_codes[j] == -128);
        }
    }
    *kept_count = kept;
    return outside;
}

#ifdef HAVE_WIDE
/* encode_16 on 64 elements at a time, n a multiple of 64: the kept codes are compressed
   into place (vpcompressb) and stored under a mask, so nothing is written past them; the
   escaped elements are found from the bitmasks. Sets *kept and returns how many escaped. */
WIDE static i64 encode_16_wide(i64 n, const uint8_t *restrict mask, const int16_t *restrict expert,
                               const int16_t *restrict base, uint8_t *restrict packed, int8_t *restrict codes,
                               int16_t *restrict escaped, i64 *kept_count) {
    const __m512i shift = _mm512_set1_epi16(127), limit = _mm512_set1_epi16(254);
    const __m512i escape = _mm512_set1_epi8(-128);
    i64 kept = 0, outside = 0;
    for (i64 j = 0; j < n; j += 64) {
        __m512i in = _mm512_loadu_si512(mask + j);
        uint64_t k = _mm512_test_epi8_mask(in, in);
        /* Element 8b + i goes to bit 7 - i of byte b (np.packbits): each byte's bits reversed. */
        uint64_t bits = ((k >> 1) & 0x5555555555555555ULL) | ((k & 0x5555555555555555ULL) << 1);
        bits = ((bits >> 2) & 0x3333333333333333ULL) | ((bits & 0x3333333333333333ULL) << 2);
        bits = ((bits >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((bits & 0x0F0F0F0F0F0F0F0FULL) << 4);
        memcpy(packed + j / 8, &bits, sizeof bits);
        __m512i low = _mm512_sub_epi16(_mm512_loadu_si512(expert + j), _mm512_loadu_si512(base + j));
        __m512i high = _mm512_sub_epi16(_mm512_loadu_si512(expert + j + 32), _mm512_loadu_si512(base + j + 32));
        /* A difference fits when difference + 127, as unsigned, is at most 254. */
        uint64_t fits = (uint64_t)_mm512_cmple_epu16_mask(_mm512_add_epi16(low, shift), limit) |
                        (uint64_t)_mm512_cmple_epu16_mask(_mm512_add_epi16(high, shift), limit) << 32;
        __m512i bytes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi16_epi8(low)),
                                           _mm512_cvtepi16_epi8(high), 1);
        bytes = _mm512_maskz_compress_epi8(k, _mm512_mask_mov_epi8(escape, fits, bytes));
        int count = __builtin_popcountll(k);
        _mm512_mask_storeu_epi8(codes + kept, count == 64 ? ~0ULL : (1ULL << count) - 1, bytes);
        kept += count;
        for (uint64_t out = k & ~fits; out; out &= out - 1) escaped[outside++] = expert[j + __builtin_ctzll(out)];
    }
    *kept_count = kept;
    return outside;
}
#endif

void mb_encode_16(i64 n, const uint8_t *restrict mask, const int16_t *restrict expert,
                  const int16_t *restrict base, uint8_t *restrict packed, int8_t *restrict codes,
                  int16_t *restrict escaped, i64 *restrict counts) {
    i64 done = 0, kept = 0, outside = 0;
#ifdef HAVE_WIDE
    if (wide()) {
        done = n - n % 64;
        outside = encode_16_wide(done, mask, expert, base, packed, codes, escaped, &kept);
    }
#endif
    i64 rest_kept;
    outside += encode_16(n - done, mask + done, expert + done, base + done, packed + done / 8, codes + kept,
                         escaped + outside, &rest_kept);
    counts[0] = kept + rest_kept;
    counts[1] = outside;
}

/* The 64-bit hash of flat index `index` of a random stream (rng._hashed_blocks): SplitMix64's
   finalizer (`finalized`) over key + index * golden ratio, all mod 2^64. */
#define GOLDEN 0x9E3779B97F4A7C15ULL

static inline __attribute__((always_inline)) uint64_t finalized(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline __attribute__((always_inline)) uint64_t stream_hash(uint64_t key, uint64_t index) {
    return finalized(key + index * GOLDEN);
}

#define HASHES_BELOW_LOOP                                                   \
    uint64_t x = key + start * GOLDEN; /* index * golden: one addition per element */ \
    for (i64 j = 0; j < n; j++, x += GOLDEN) out[j] = finalized(x) < bound;
#define HASH_WORDS_LOOP               \
    uint64_t x = key + start * GOLDEN; \
    for (i64 j = 0; j < n; j++, x += GOLDEN) out[j] = finalized(x) ^ 0x8000000000000000ULL;

#ifdef HAVE_WIDE
/* Eight hashes at once: `x` holds key + index * golden of eight consecutive indices. */
WIDE static inline __m512i finalized_wide(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 30));
    x = _mm512_mullo_epi64(x, _mm512_set1_epi64((long long)0xBF58476D1CE4E5B9ULL));
    x = _mm512_xor_si512(x, _mm512_srli_epi64(x, 27));
    x = _mm512_mullo_epi64(x, _mm512_set1_epi64((long long)0x94D049BB133111EBULL));
    return _mm512_xor_si512(x, _mm512_srli_epi64(x, 31));
}

WIDE static inline __m512i first_indices(uint64_t key, uint64_t start) {
    uint64_t x = key + start * GOLDEN;
    return _mm512_setr_epi64((long long)x, (long long)(x + GOLDEN), (long long)(x + 2 * GOLDEN),
                             (long long)(x + 3 * GOLDEN), (long long)(x + 4 * GOLDEN), (long long)(x + 5 * GOLDEN),
                             (long long)(x + 6 * GOLDEN), (long long)(x + 7 * GOLDEN));
}

/* Returns how many were done (a multiple of 64); the caller does the rest. */
WIDE static i64 hashes_below_wide(uint64_t key, uint64_t start, i64 n, uint64_t bound, uint8_t *restrict out) {
    __m512i x = first_indices(key, start);
    const __m512i step = _mm512_set1_epi64((long long)(8 * GOLDEN)), below = _mm512_set1_epi64((long long)bound);
    i64 done = n - n % 64;
    for (i64 j = 0; j < done; j += 64) {
        uint64_t k = 0;
        for (int q = 0; q < 8; q++, x = _mm512_add_epi64(x, step))
            k |= (uint64_t)_mm512_cmplt_epu64_mask(finalized_wide(x), below) << (8 * q);
        _mm512_storeu_si512(out + j, _mm512_maskz_mov_epi8(k, _mm512_set1_epi8(1)));
    }
    return done;
}

WIDE static i64 hash_words_wide(uint64_t key, uint64_t start, i64 n, uint64_t *restrict out) {
    __m512i x = first_indices(key, start);
    const __m512i step = _mm512_set1_epi64((long long)(8 * GOLDEN));
    const __m512i top = _mm512_set1_epi64((long long)0x8000000000000000ULL);
    i64 done = n - n % 8;
    for (i64 j = 0; j < done; j += 8, x = _mm512_add_epi64(x, step))
        _mm512_storeu_si512(out + j, _mm512_xor_si512(finalized_wide(x), top));
    return done;
}
#endif

/* out[j] = hash of index start + j is below `bound` (rng.keep_mask). */
void mb_hashes_below(uint64_t key, uint64_t start, i64 n, uint64_t bound, uint8_t *restrict out) {
#ifdef HAVE_WIDE
    if (wide()) {
        i64 done = hashes_below_wide(key, start, n, bound, out);
        start += (uint64_t)done, n -= done, out += done;
    }
#endif
    HASHES_BELOW_LOOP
}

/* out[j] = hash of index start + j with its top bit flipped (rng.uniform_words: as an int64). */
void mb_hash_words(uint64_t key, uint64_t start, i64 n, uint64_t *restrict out) {
#ifdef HAVE_WIDE
    if (wide()) {
        i64 done = hash_words_wide(key, start, n, out);
        start += (uint64_t)done, n -= done, out += done;
    }
#endif
    HASH_WORDS_LOOP
}

/* The integer sums behind fixed_point.masked_sums, of all of `values` (non-negative float32)
   and of those where `mask`: each value times the `count` scales in turn, then its integer
   part (truncated) and its fraction times 2^31 (truncated) summed apart. sums: whole and
   fraction of all, whole and fraction of the kept ones. */
#ifdef HAVE_WIDE
/* mb_masked_sums on 16 elements at a time, n a multiple of 16, adding to `sums`. Each
   value's two integers are widened to 64 bits and added to the sums of all, and under the
   mask to those of the kept (the same integers a kept value gives: mask * v is v). */
WIDE static void masked_sums_wide(i64 n, const float *restrict values, const uint8_t *restrict mask,
                                  const float step[4], i64 sums[4]) {
    const __m512 unit = _mm512_set1_ps(0x1p31f);
    __m512i whole = _mm512_setzero_si512(), fraction = whole, kept_whole = whole, kept_fraction = whole;
    for (i64 j = 0; j < n; j += 16) {
        __m512 v = _mm512_loadu_ps(values + j);
        for (int s = 0; s < 4; s++) v = _mm512_mul_ps(v, _mm512_set1_ps(step[s]));
        __m512i v_whole = _mm512_cvttps_epi32(v);
        __m512i v_fraction = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(v_whole)), unit));
        __m128i in = _mm_loadu_si128((const __m128i *)(mask + j));
        __mmask16 k = _mm_test_epi8_mask(in, in);
        __m512i parts[4] = {
            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v_whole)),
            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v_whole, 1)),
            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v_fraction)),
            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v_fraction, 1)),
        };
        whole = _mm512_add_epi64(whole, _mm512_add_epi64(parts[0], parts[1]));
        fraction = _mm512_add_epi64(fraction, _mm512_add_epi64(parts[2], parts[3]));
        kept_whole = _mm512_mask_add_epi64(kept_whole, (__mmask8)k, kept_whole, parts[0]);
        kept_whole = _mm512_mask_add_epi64(kept_whole, (__mmask8)(k >> 8), kept_whole, parts[1]);
        kept_fraction = _mm512_mask_add_epi64(kept_fraction, (__mmask8)k, kept_fraction, parts[2]);
        kept_fraction = _mm512_mask_add_epi64(kept_fraction, (__mmask8)(k >> 8), kept_fraction, parts[3]);
    }
    sums[0] += _mm512_reduce_add_epi64(whole);
    sums[1] += _mm512_reduce_add_epi64(fraction);
    sums[2] += _mm512_reduce_add_epi64(kept_whole);
    sums[3] += _mm512_reduce_add_epi64(kept_fraction);
}
#endif

void mb_masked_sums(i64 n, const float *restrict values, const uint8_t *restrict mask, const float *scales,
                    int count, i64 *restrict sums) {
    float step[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (int s = 0; s < count && s < 4; s++) step[s] = scales[s];
    i64 whole = 0, fraction = 0, kept_whole = 0, kept_fraction = 0;
    sums[0] = sums[1] = sums[2] = sums[3] = 0;
#ifdef HAVE_WIDE
    if (wide()) {
        i64 done = n - n % 16;
        masked_sums_wide(done, values, mask, step, sums);
        values += done, mask += done, n -= done;
    }
#endif
    for (i64 j = 0; j < n; j++) {
        /* Scaling by powers of two is exact but for underflow, which the same steps give. */
        float v = values[j] * step[0] * step[1] * step[2] * step[3];
        float kept = (float)mask[j] * v;
        int32_t v_whole = (int32_t)v, kept_int = (int32_t)kept;
        whole += v_whole;
        fraction += (int32_t)((v - (float)v_whole) * 0x1p31f);
        kept_whole += kept_int;
        kept_fraction += (int32_t)((kept - (float)kept_int) * 0x1p31f);
    }
    sums[0] += whole;
    sums[1] += fraction;
    sums[2] += kept_whole;
    sums[3] += kept_fraction;
}

/* della's sort keys of a slice of rows (sparsify._stable_order): the bit pattern of |a - b|
   (of |a| when b is NULL) shifted left by `shift`, with the element's flat index in the low
   bits, so that a plain sort of each row orders it by magnitude, ties by position. */
void mb_della_keys(i64 n, const void *a, int ka, const void *b, int kb, int shift, int64_t *restrict out) {
#define DELLA_KEYS(KA, KB)                                                                        \
    for (i64 j = 0; j < n; j++) {                                                                 \
        float x = b ? load(a, KA, j) - load(b, KB, j) : load(a, KA, j);                           \
        out[j] = ((int64_t)(bits_of(x) & 0x7FFFFFFF) << shift) | j;                               \
    }
    BY_KINDS(ka, kb, DELLA_KEYS)
#undef DELLA_KEYS
}

/* della's mask of a slice of `rows` rows of `length` elements, from each row's keys sorted
   (mb_della_keys): the element of ascending rank r in its row, at flat index j of the slice
   (the keys' low `shift` bits), is kept iff its draw's word (rng.uniform_words: the hash of
   index first + j of stream `key`, top bit flipped, as an int64) is below bounds[r]. A row's
   words are hashed in index order first, into a buffer that stays in the L1 cache (the
   index times the golden ratio then grows by one addition per element). */
void mb_della_keep(i64 rows, i64 length, const int64_t *restrict sorted, int shift, uint64_t key,
                   uint64_t first, const int64_t *restrict bounds, uint8_t *restrict out) {
    enum { PIECE = 2048 };
    int64_t words[PIECE];
    const int64_t low = ((int64_t)1 << shift) - 1;
    for (i64 row = 0; row < rows; row++) {
        const int64_t *keys = sorted + row * length;
        const i64 row_start = row * length;
        if (length > PIECE) {
            for (i64 r = 0; r < length; r++) {
                int64_t j = keys[r] & low;
                int64_t word = (int64_t)(stream_hash(key, first + (uint64_t)j) ^ 0x8000000000000000ULL);
                out[j] = word < bounds[r];
            }
            continue;
        }
        mb_hash_words(key, first + (uint64_t)row_start, length, (uint64_t *)words);
        for (i64 r = 0; r < length; r++) {
            int64_t j = keys[r] & low;
            out[j] = words[j - row_start] < bounds[r];
        }
    }
}

/* della's mask without sorting the row, where its magnitudes repeat. The deltas of 16-bit
   models hold a few dozen to a few hundred distinct magnitudes in a row of thousands, so
   each distinct key is counted in a hash table (with the number of its elements before
   each element, in position order), the distinct keys alone are sorted, and each element's
   rank is where its key starts plus the count before it: the rank the sort by (key,
   position) gives. A row of more distinct keys than a DELLA_DISTINCT_SHARE of its length (or
   than DELLA_MAX_DISTINCT) is left to the sort (mb_della_keys, mb_della_keep), which is then
   the cheaper. */
enum { DELLA_DISTINCT_SHARE = 4, DELLA_MIN_DISTINCT = 16, DELLA_MAX_DISTINCT = 1 << 14 };

/* The most distinct keys mb_della_mask takes in a row of `length`, and the slots of its table
   (a power of two, at least twice as many). */
static i64 della_distinct_cap(i64 length) {
    i64 cap = length / DELLA_DISTINCT_SHARE;
    return cap < DELLA_MIN_DISTINCT ? DELLA_MIN_DISTINCT : cap > DELLA_MAX_DISTINCT ? DELLA_MAX_DISTINCT : cap;
}

i64 mb_della_table_size(i64 length) {
    i64 size = 16;
    while (size < 2 * (della_distinct_cap(length) + 2)) size *= 2;
    return size;
}

/* Sorts items[0..count) by their high 32 bits (non-negative keys, each once): an LSD radix sort
   by bytes, skipping the bytes every key shares. */
static void sort_by_key(int64_t *restrict items, int64_t *restrict spare, i64 count) {
    uint32_t any = 0, all = 0xFFFFFFFFu;
    for (i64 i = 0; i < count; i++) {
        uint32_t k = (uint32_t)(items[i] >> 32);
        any |= k;
        all &= k;
    }
    int64_t *from = items, *to = spare;
    for (int shift = 32; shift < 64; shift += 8) {
        if ((((any ^ all) >> (shift - 32)) & 255) == 0) continue;
        int32_t at[256] = {0};
        for (i64 i = 0; i < count; i++) at[(from[i] >> shift) & 255]++;
        int32_t total = 0;
        for (int v = 0; v < 256; v++) {
            int32_t here = at[v];
            at[v] = total;
            total += here;
        }
        for (i64 i = 0; i < count; i++) to[at[(from[i] >> shift) & 255]++] = from[i];
        int64_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != items) memcpy(items, from, sizeof *items * (size_t)count);
}

/* della's mask (see mb_della_keep) of the rows of a slice of `rows` rows of `length` elements of
   |a - b| (of |a| when b is NULL) into `out`, the element at flat index j of the slice with the
   draw of index first + j of stream `key`; returns how many rows it did, in order, stopping at
   the first of too many distinct magnitudes. Working space: keys, slot and place (int32), words
   and distinct and spare (int64), `length` each; table (int32) of mb_della_table_size(length),
   tally (int32) of four times that. */
i64 mb_della_mask(i64 rows, i64 length, const void *a, int ka, const void *b, int kb, uint64_t key,
                  uint64_t first, const int64_t *restrict bounds, int32_t *restrict keys, int32_t *restrict slot,
                  int32_t *restrict place, int64_t *restrict words, int64_t *restrict distinct,
                  int64_t *restrict spare, int32_t *restrict table, int32_t *restrict tally, uint8_t *restrict out) {
    const i64 cap = della_distinct_cap(length), size = mb_della_table_size(length);
    int bits = 0;
    while (((i64)1 << bits) < size) bits++;
    /* Per slot: its elements in each half of the row, then where each half's start in rank. */
    int32_t *count0 = tally, *count1 = tally + size, *start0 = tally + 2 * size, *start1 = tally + 3 * size;
    for (i64 h = 0; h < size; h++) table[h] = -1; /* keys are non-negative */
    memset(tally, 0, sizeof *tally * (size_t)size * 2);
    /* The halves are counted side by side: two chains of updates to a repeated key's count. */
    const i64 half = (length + 1) / 2;
    for (i64 row = 0; row < rows; row++) {
        const i64 offset = row * length;
#define DELLA_ROW_KEYS(KA, KB)                                                                       \
    for (i64 j = 0; j < length; j++) {                                                               \
        float x = b ? load(a, KA, offset + j) - load(b, KB, offset + j) : load(a, KA, offset + j); \
        keys[j] = bits_of(x) & 0x7FFFFFFF;                                                            \
    }
        BY_KINDS(ka, kb, DELLA_ROW_KEYS)
#undef DELLA_ROW_KEYS
        i64 found = 0;
#define DELLA_COUNT(J, COUNTS)                                             \
    {                                                                      \
        int32_t k = keys[J];                                               \
        uint32_t h = ((uint32_t)k * 0x9E3779B1u) >> (32 - bits);           \
        while (table[h] != k) {                                            \
            if (table[h] < 0) {                                            \
                table[h] = k;                                              \
                distinct[found++] = ((int64_t)k << 32) | h;                \
                break;                                                     \
            }                                                              \
            h = (h + 1) & (uint32_t)(size - 1);                            \
        }                                                                  \
        slot[J] = (int32_t)h;                                              \
        place[J] = COUNTS[h]++;                                            \
    }
        for (i64 j = 0; j + half < length && found <= cap; j++) {
            DELLA_COUNT(j, count0)
            DELLA_COUNT(j + half, count1)
        }
        if ((length & 1) && found <= cap) DELLA_COUNT(half - 1, count0)
#undef DELLA_COUNT
        const int whole = found <= cap;
        if (whole) {
            sort_by_key(distinct, spare, found);
            int32_t rank = 0;
            for (i64 d = 0; d < found; d++) {
                int32_t h = (int32_t)(distinct[d] & 0xFFFFFFFF);
                start0[h] = rank;
                start1[h] = rank + count0[h];
                rank += count0[h] + count1[h];
            }
            mb_hash_words(key, first + (uint64_t)offset, length, (uint64_t *)words);
            for (i64 j = 0; j < half; j++) out[offset + j] = words[j] < bounds[start0[slot[j]] + place[j]];
            for (i64 j = half; j < length; j++) out[offset + j] = words[j] < bounds[start1[slot[j]] + place[j]];
        }
        for (i64 d = 0; d < found; d++) {
            int32_t h = (int32_t)(distinct[d] & 0xFFFFFFFF);
            table[h] = -1;
            count0[h] = count1[h] = 0;
        }
        if (!whole) return row;
    }
    return rows;
}
