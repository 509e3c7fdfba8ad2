/* A vectorised evaluator of XGBoost tree ensembles, independent of any model: the trees come in as arrays.
 *
 * Every tree is padded into a complete binary tree of the ensemble's depth D, in heap order: internal node k has
 * children 2k+1 (left) and 2k+2 (right); there are 2^D - 1 internal nodes and 2^D leaves per tree (stored one
 * tree after the other, with 64 spare entries after the last so a 64-wide load past a small tree stays inside).
 * A leaf XGBoost grew at a shallower depth becomes a subtree whose leaves all hold its value, so every row takes
 * exactly D steps in every tree and a step has no branch: node = 2*node + 1 + right.
 *
 * key[k] = split feature | (default_left << 31): one load gives both (a negative key sends NaN left).
 *
 * XGBoost's semantics, kept exactly: features are float32, a row goes left when x < threshold (float32), a NaN
 * (missing) goes to the node's default side, and a row's margin is base + tree 0 + tree 1 + ... summed in float32
 * in tree order, so margins equal inplace_predict's bit for bit. Built without -ffast-math: the NaN tests and the
 * summation order depend on it.
 *
 * Rows are taken BLOCK at a time and each tree level is one pass over the block, so many independent rows are in
 * flight. With AVX-512 and D <= 6 a tree's nodes live in registers and are looked up by permutes (the row's value
 * is the only gather): ~7x inplace_predict on one core. With AVX2 only and D <= 6, a level's nodes are permuted
 * from the arrays 8 rows at a time (again the row's value is the only gather of a step): ~5x inplace_predict on an
 * AVX2-only EPYC, 2.6x the portable loop there. Elsewhere the portable loop (gcc vectorises it) ~2x.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define BLOCK 64
#define BLOCK_SHIFT 6 /* log2(BLOCK) */
#define FEATURE_BITS 0x7fffffff

static inline int32_t step(const float *row, const int32_t *key, const float *threshold, int32_t k) {
    int32_t packed = key[k];
    float v = row[packed & FEATURE_BITS];
    /* right when v >= t (false for NaN), or NaN with the default on the right (key >= 0) */
    int32_t right = (v >= threshold[k]) | ((v != v) & (packed >= 0));
    return 2 * k + 1 + right;
}

/* xb: the block's rows transposed (feature f of row r at f * BLOCK + r), so a level's loads are near each other. */
static void block_margin(const float *xb, const int32_t *key, const float *threshold, const float *leaf,
                         int32_t n_trees, int32_t depth, float *acc, int32_t *leaves) {
    const int32_t n_internal = (1 << depth) - 1;
    const int32_t n_leaves = 1 << depth;
    int32_t node[BLOCK];
    for (int32_t t = 0; t < n_trees; t++) {
        const int32_t *tk = key + (int64_t)t * n_internal;
        const float *tt = threshold + (int64_t)t * n_internal;
        const float *tl = leaf + (int64_t)t * n_leaves;
        for (int32_t r = 0; r < BLOCK; r++) node[r] = 0;
        for (int32_t d = 0; d < depth; d++) {
            for (int32_t r = 0; r < BLOCK; r++) {
                int32_t k = node[r];
                int32_t packed = tk[k];
                float v = xb[(packed & FEATURE_BITS) * BLOCK + r];
                int32_t right = (v >= tt[k]) | ((v != v) & (packed >= 0));
                node[r] = 2 * k + 1 + right;
            }
        }
        for (int32_t r = 0; r < BLOCK; r++) acc[r] += tl[node[r] - n_internal];
        if (leaves != NULL)
            for (int32_t r = 0; r < BLOCK; r++) leaves[(int64_t)t * BLOCK + r] = node[r] - n_internal;
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* D <= 6: a tree's 63 keys, 63 thresholds and 64 leaves fit in four 16-lane registers each. */
/* groups: how many of the block's 16-row groups hold rows (a short block, as an incremental list's few re-scored
 * rows, skips the rest: 30 rows of a 149-tree model 24 us instead of 33). Inlined at each call: a full block's
 * constant 4 keeps the groups' nodes and sums in registers (a runtime count cost full blocks 7 %). */
static inline __attribute__((always_inline)) void block_margin_avx512(const float *xb, const int32_t *key,
                                                                      const float *threshold, const float *leaf,
                                                                      int32_t n_trees, int32_t depth, float *acc,
                                                                      int groups, int32_t *leaves) {
    const int32_t n_internal = (1 << depth) - 1;
    const int32_t n_leaves = 1 << depth;
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i one = _mm512_set1_epi32(1), thirty_two = _mm512_set1_epi32(32), zero = _mm512_setzero_si512();
    const __m512i feature_bits = _mm512_set1_epi32(FEATURE_BITS), block = _mm512_set1_epi32(BLOCK);
    const __m512i first_leaf = _mm512_set1_epi32(n_internal);
    __m512 sums[BLOCK / 16];
    __m512i node[BLOCK / 16];
    for (int g = 0; g < groups; g++) sums[g] = _mm512_loadu_ps(acc + 16 * g);
    for (int32_t t = 0; t < n_trees; t++) {
        const int32_t *tk = key + (int64_t)t * n_internal;
        const float *tt = threshold + (int64_t)t * n_internal;
        const float *tl = leaf + (int64_t)t * n_leaves;
        const __m512i k0 = _mm512_loadu_si512(tk), k1 = _mm512_loadu_si512(tk + 16);
        const __m512i k2 = _mm512_loadu_si512(tk + 32), k3 = _mm512_loadu_si512(tk + 48);
        const __m512 t0 = _mm512_loadu_ps(tt), t1 = _mm512_loadu_ps(tt + 16);
        const __m512 t2 = _mm512_loadu_ps(tt + 32), t3 = _mm512_loadu_ps(tt + 48);
        const __m512 l0 = _mm512_loadu_ps(tl), l1 = _mm512_loadu_ps(tl + 16);
        const __m512 l2 = _mm512_loadu_ps(tl + 32), l3 = _mm512_loadu_ps(tl + 48);
        for (int g = 0; g < groups; g++) node[g] = zero;
        for (int32_t d = 0; d < depth; d++) {
            for (int g = 0; g < groups; g++) {
                __m512i k = node[g];
                __mmask16 high = _mm512_cmpge_epi32_mask(k, thirty_two);  /* nodes 32..62: the upper pair */
                __m512i packed = _mm512_mask_blend_epi32(high, _mm512_permutex2var_epi32(k0, k, k1),
                                                         _mm512_permutex2var_epi32(k2, k, k3));
                __m512 thr = _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(t0, k, t1),
                                                  _mm512_permutex2var_ps(t2, k, t3));
                __m512i at = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(packed, feature_bits), block),
                                              _mm512_add_epi32(lanes, _mm512_set1_epi32(16 * g)));
                __m512 v = _mm512_i32gather_ps(at, xb, 4);
                __mmask16 right = _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ) |
                                  (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) & _mm512_cmpge_epi32_mask(packed, zero));
                __m512i next = _mm512_add_epi32(_mm512_add_epi32(k, k), one);
                node[g] = _mm512_mask_add_epi32(next, right, next, one);
            }
        }
        for (int g = 0; g < groups; g++) {
            __m512i k = _mm512_sub_epi32(node[g], first_leaf);
            if (leaves != NULL) _mm512_storeu_si512(leaves + (int64_t)t * BLOCK + 16 * g, k);
            __mmask16 high = _mm512_cmpge_epi32_mask(k, thirty_two);
            sums[g] = _mm512_add_ps(sums[g], _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(l0, k, l1),
                                                                  _mm512_permutex2var_ps(l2, k, l3)));
        }
    }
    for (int g = 0; g < groups; g++) _mm512_storeu_ps(acc + 16 * g, sums[g]);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
/* table[j] in each of 8 lanes, j in [0, size), size a power of two (at most 64; entries past a small table are
 * loaded and never chosen: the arrays carry 64 spare entries). An 8-entry chunk is one register permute; a larger
 * table is its chunks permuted and blended by j >> 3. Bitwise, so a float comes out exactly as stored. */
static inline __attribute__((always_inline)) __m256 lookup8(const float *table, int32_t size, __m256i j) {
    __m256 out = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), j);
    const __m256i chunk = _mm256_srli_epi32(j, 3);
    for (int32_t base = 8; base < size; base += 8) {
        __m256 c = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + base), j);
        __m256i hit = _mm256_cmpeq_epi32(chunk, _mm256_set1_epi32(base >> 3));
        out = _mm256_blendv_ps(out, c, _mm256_castsi256_ps(hit));
    }
    return out;
}

/* D <= 6 with AVX2 (no AVX-512): level d's 2^d nodes are looked up by permutes from the tree's arrays (a level
 * of at most 32 nodes: four registers), so the row's value is the only gather of a step (the portable loop
 * gathers the key and the threshold too); a leaf is one gather. 8 rows a group, the block's 8 groups in turn. */
static void block_margin_avx2(const float *xb, const int32_t *key, const float *threshold, const float *leaf,
                              int32_t n_trees, int32_t depth, float *acc, int groups, int32_t *leaves) {
    const int32_t n_internal = (1 << depth) - 1;
    const int32_t n_leaves = 1 << depth;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i minus_one = _mm256_set1_epi32(-1), feature_bits = _mm256_set1_epi32(FEATURE_BITS);
    __m256 sums[BLOCK / 8];
    __m256i node[BLOCK / 8];  /* the node's index within its level */
    for (int g = 0; g < groups; g++) sums[g] = _mm256_loadu_ps(acc + 8 * g);
    for (int32_t t = 0; t < n_trees; t++) {
        const int32_t *tk = key + (int64_t)t * n_internal;
        const float *tt = threshold + (int64_t)t * n_internal;
        const float *tl = leaf + (int64_t)t * n_leaves;
        for (int g = 0; g < groups; g++) node[g] = _mm256_setzero_si256();
        for (int32_t d = 0; d < depth; d++) {
            const int32_t first = (1 << d) - 1, size = 1 << d;
            const float *level_keys = (const float *)(tk + first);
            for (int g = 0; g < groups; g++) {
                __m256i j = node[g];
                __m256i packed = _mm256_castps_si256(lookup8(level_keys, size, j));
                __m256 thr = lookup8(tt + first, size, j);
                __m256i rows = _mm256_add_epi32(lanes, _mm256_set1_epi32(8 * g));
                __m256i at = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(packed, feature_bits), BLOCK_SHIFT),
                                              rows);
                __m256 v = _mm256_i32gather_ps(xb, at, 4);
                /* right when v >= t (false for NaN), or NaN with the default on the right (key >= 0) */
                __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, thr, _CMP_GE_OQ));
                __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
                __m256i right = _mm256_or_si256(ge, _mm256_and_si256(nan, _mm256_cmpgt_epi32(packed, minus_one)));
                /* next level's index: 2j + right (right is -1 when true) */
                node[g] = _mm256_sub_epi32(_mm256_add_epi32(j, j), right);
            }
        }
        for (int g = 0; g < groups; g++)
            sums[g] = _mm256_add_ps(sums[g], _mm256_i32gather_ps(tl, node[g], 4));
        if (leaves != NULL)
            for (int g = 0; g < groups; g++) _mm256_storeu_si256((__m256i *)(leaves + (int64_t)t * BLOCK + 8 * g), node[g]);
    }
    for (int g = 0; g < groups; g++) _mm256_storeu_ps(acc + 8 * g, sums[g]);
}
#endif

/* The name of the kernel this build uses, for the evaluator's description. */
const char *tree_eval_kernel(int32_t depth) {
#if defined(__AVX512F__)
    if (depth <= 6) return "avx512";
#elif defined(__AVX2__)
    if (depth <= 6) return "avx2";
#endif
    (void)depth;
    return "portable";
}

/* acc[r] += the trees' leaves of the block's rows (xb transposed, m of BLOCK rows in use), by the kernel of this
 * build; with leaves != NULL also each row's leaf index in each tree (leaves[t * BLOCK + r], 0 .. 2^D - 1). */
static void margin_block(const float *xb, int64_t m, const int32_t *key, const float *threshold, const float *leaf,
                         int32_t n_trees, int32_t depth, float *acc, int32_t *leaves) {
#if defined(__AVX512F__)
    if (depth <= 6) {
        if (m == BLOCK)
            block_margin_avx512(xb, key, threshold, leaf, n_trees, depth, acc, BLOCK / 16, leaves);
        else
            block_margin_avx512(xb, key, threshold, leaf, n_trees, depth, acc, (int)((m + 15) / 16), leaves);
        return;
    }
#elif defined(__AVX2__)
    if (depth <= 6) {
        block_margin_avx2(xb, key, threshold, leaf, n_trees, depth, acc, (int)((m + 7) / 8), leaves);
        return;
    }
#endif
    (void)m;
    block_margin(xb, key, threshold, leaf, n_trees, depth, acc, leaves);
}

/* out[i] = margin of row i (x: n rows of n_features float32, row-major). */
void tree_eval_margin(const float *x, int64_t n, int32_t n_features, const int32_t *key, const float *threshold,
                      const float *leaf, int32_t n_trees, int32_t depth, float base, float *out) {
    float acc[BLOCK];
    float xb[n_features * BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        for (int64_t r = 0; r < BLOCK; r++) {
            acc[r] = base;
            for (int32_t f = 0; f < n_features; f++) xb[f * BLOCK + r] = r < m ? x[(start + r) * n_features + f] : 0.0f;
        }
        margin_block(xb, m, key, threshold, leaf, n_trees, depth, acc, NULL);
        memcpy(out + start, acc, (size_t)m * sizeof(float));
    }
}

/* out[i] = sigmoid(margin of row i), as XGBoost's binary:logistic computes it (float32, expf). */
void tree_eval_sigmoid(const float *x, int64_t n, int32_t n_features, const int32_t *key, const float *threshold,
                       const float *leaf, int32_t n_trees, int32_t depth, float base, float *out) {
    tree_eval_margin(x, n, n_features, key, threshold, leaf, n_trees, depth, base, out);
    for (int64_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + expf(-out[i]));
}

/* Saabas contributions (XGBoost's approx_contribs): along each row's path, the change of the cover-weighted mean
 * value from a node to its child is credited to the node's split feature; the bias column (index n_features) gets
 * every tree's root mean plus the base margin. mean: per tree 2^(D+1) - 1 node means in heap order (internal nodes
 * then leaves; padding carries its leaf's value, so steps through it add 0). Like XGBoost, a tree's contributions
 * are summed apart (float32) then added to the row's. out: n rows of n_features + 1. For the few shown rows only:
 * plain scalar code. */
void tree_eval_contribs(const float *x, int64_t n, int32_t n_features, const int32_t *key, const float *threshold,
                        const float *mean, int32_t n_trees, int32_t depth, float base, float *out) {
    const int32_t n_internal = (1 << depth) - 1;
    const int32_t n_nodes = (2 << depth) - 1;
    const int32_t width = n_features + 1;
    float local[width];
    for (int64_t i = 0; i < n; i++) {
        const float *row = x + i * n_features;
        float *o = out + i * width;
        memset(o, 0, (size_t)width * sizeof(float));
        for (int32_t t = 0; t < n_trees; t++) {
            const int32_t *tk = key + (int64_t)t * n_internal;
            const float *tt = threshold + (int64_t)t * n_internal;
            const float *tm = mean + (int64_t)t * n_nodes;
            memset(local, 0, (size_t)width * sizeof(float));
            local[n_features] = tm[0];
            int32_t k = 0;
            for (int32_t d = 0; d < depth; d++) {
                int32_t child = step(row, tk, tt, k);
                local[tk[k] & FEATURE_BITS] += tm[child] - tm[k];
                k = child;
            }
            for (int32_t c = 0; c < width; c++) o[c] += local[c];
        }
        o[n_features] += base;
    }
}

/* ---- kept lists' as-of columns (ranking/incremental.py) ----------------------------------------------------------
 * Not tree evaluation, but the other numeric loop of an incremental list, in the same library: for m kept rows,
 * the candidate activity columns (3 decayed counts, days since the latest change) and the view recency at as_of,
 * bit for bit the float64 operations of IncrementalLists._as_of_columns (and so of the feature matrix): exp is
 * libm's, the function Python's math.exp calls (numpy's vectorised exp may differ in the last bit), and -std=c11
 * without -ffast-math keeps every operation as written (no contraction). With until != NULL also the as-of time
 * before which no column of a row crosses a split threshold (_until_falling / _until_growing there; log's last
 * bit does not matter: the bound keeps a margin).
 * values: m x 3 held counts at the anchors; block: m x 5 out (act 1d, 7d, 30d, days since, recency);
 * thresholds: 5 sorted runs, offsets[c]..offsets[c+1] (the 3 counts' exact thresholds, then the two growing
 * columns' thresholds lowered by one float32 step). */
/* How many of the sorted t are at or below x (inclusive) or below it; n for NaN (it sorts last, as in numpy). */
static int64_t count_sorted(const double *t, int64_t n, double x, int inclusive) {
    if (x != x) return n;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = (lo + hi) >> 1;
        if (t[mid] < x || (inclusive && t[mid] == x)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* t: the lowered thresholds. The next threshold the float32 of x is below is the first lowered one at or above
 * it: for x within a float32 step under a threshold (past its lowered value, not yet rounding up to it) that is
 * the threshold itself, whose time is then already past: the row re-scores at its next update. */
static int64_t until_growing(const double *t, int64_t n, double x, double base, int64_t until) {
    int64_t index = count_sorted(t, n, (double)(float)x, 0);
    if (index < n) {
        double span = t[index] * 86400000.0;
        int64_t at = (int64_t)floor(base + span - 1.0 - 1e-9 * span);
        if (at < until) until = at;
    }
    return until;
}

/* A candidate's activity columns as of as_of into b[0..3]: the three counts decayed (libm's exp, the bits of the
 * math.exp of the Python path; the division of the exact doubles -age and tau rounds as Python's int true
 * division does) and the days since the latest change; 0, 0, 0 and NaN for a user never connected. */
static inline void activity_row(const double *held, int64_t anchor_ms, uint8_t is_known, int64_t as_of,
                                const int64_t *taus, double *b) {
    if (!is_known) {
        b[0] = b[1] = b[2] = 0.0;
        b[3] = NAN;
        return;
    }
    int64_t age = as_of - anchor_ms;
    if (age < 0) age = 0;
    for (int j = 0; j < 3; j++) b[j] = held[j] * exp((double)(-age) / (double)taus[j]);
    double since = (double)as_of - (double)anchor_ms;
    b[3] = (since < 0.0 ? 0.0 : since) / 86400000.0;
}

/* One row of kept_rows_as_of: its five columns into b, and its bound into *until (until != NULL). */
static inline void as_of_row(const double *held, int64_t anchor_ms, uint8_t is_known, int64_t latest,
                             uint8_t viewed, int64_t as_of, const int64_t *taus, const double *thresholds,
                             const int64_t *offsets, double *b, int64_t *until) {
    activity_row(held, anchor_ms, is_known, as_of, taus, b);
    int64_t lag = as_of - latest;
    if (lag < 0) lag = 0;
    b[4] = viewed ? (double)lag / 86400000.0 : NAN;
    if (until == NULL) return;
    int64_t u = INT64_MAX;
    double anchor = (double)anchor_ms;
    for (int j = 0; j < 3; j++) {
        const double *t = thresholds + offsets[j];
        int64_t n = offsets[j + 1] - offsets[j];
        if (n == 0) continue;
        /* the value's float32, as the trees compare it: a value just under a threshold that rounds onto it is
         * on its right side, and the threshold is still ahead (its time may be past: the row re-scores now) */
        int64_t index = count_sorted(t, n, (double)(float)b[j], 1) - 1;
        double below = t[index < 0 ? 0 : index];
        if (index >= 0 && below > 0 && held[j] > 0) {
            double span = (double)taus[j] * log(held[j] / below);
            int64_t at = (int64_t)floor(anchor + span - 1.0 - 1e-9 * fabs(span));
            if (at < u) u = at;
        }
    }
    u = until_growing(thresholds + offsets[3], offsets[4] - offsets[3], b[3], anchor, u);
    u = until_growing(thresholds + offsets[4], offsets[5] - offsets[4], b[4], (double)latest, u);
    *until = u;
}

void kept_rows_as_of(int64_t m, const double *values, const int64_t *anchors, const uint8_t *known,
                     const int64_t *latest, const uint8_t *has_view, int64_t as_of, const int64_t *taus,
                     const double *thresholds, const int64_t *offsets, double *block, int64_t *until) {
    for (int64_t i = 0; i < m; i++)
        as_of_row(values + 3 * i, anchors[i], known[i], latest[i], has_view[i], as_of, taus, thresholds, offsets,
                  block + 5 * i, until == NULL ? NULL : until + i);
}

/* The candidate activity columns of a full list (ranking/features.py candidate_activity_columns, activity_row)
 * written into its feature matrix x (row-major, `stride` doubles a row) from column `col`. */
void activity_columns(int64_t m, const double *values, const int64_t *anchors, const uint8_t *known, int64_t as_of,
                      const int64_t *taus, double *x, int64_t stride, int64_t col) {
    for (int64_t i = 0; i < m; i++)
        activity_row(values + 3 * i, anchors[i], known[i], as_of, taus, x + i * stride + col);
}

/* Row r's as-of columns (as_of_row) written into its row of the matrix x (`stride` doubles a row): the three counts
 * and days since from column col_activity, the recency at col_recency; its bound into *until (until != NULL). */
static inline void as_of_into(int64_t r, const double *values, const int64_t *anchors, const uint8_t *known,
                              const int64_t *latest, const uint8_t *has_view, int64_t as_of, const int64_t *taus,
                              const double *thresholds, const int64_t *offsets, double *x, int64_t stride,
                              int64_t col_activity, int64_t col_recency, int64_t *until) {
    double b[5];
    as_of_row(values + 3 * r, anchors[r], known[r], latest[r], has_view[r], as_of, taus, thresholds, offsets, b, until);
    double *row = x + r * stride;
    row[col_activity] = b[0];
    row[col_activity + 1] = b[1];
    row[col_activity + 2] = b[2];
    row[col_activity + 3] = b[3];
    row[col_recency] = b[4];
}

/* kept_rows_as_of for the rows `rows` of a kept list's whole arrays (values: n x 3, the others n), written straight
 * into its feature matrix x (row-major, `stride` doubles a row): the three counts and days since at columns
 * col_activity.., the recency at col_recency. Saves the caller a gather of five arrays and two scatters. */
void kept_rows_as_of_at(int64_t m, const int64_t *rows, const double *values, const int64_t *anchors,
                        const uint8_t *known, const int64_t *latest, const uint8_t *has_view, int64_t as_of,
                        const int64_t *taus, const double *thresholds, const int64_t *offsets, double *x,
                        int64_t stride, int64_t col_activity, int64_t col_recency, int64_t *until) {
    for (int64_t i = 0; i < m; i++)
        as_of_into(rows[i], values, anchors, known, latest, has_view, as_of, taus, thresholds, offsets, x, stride,
                   col_activity, col_recency, until == NULL ? NULL : until + i);
}

/* ---- a kept list's update, its numeric tail in one call (ranking/incremental.py, _AsOfKernel.update) ----------
 * Once an incremental update has written its changed columns: the rows whose held activity or view moved
 * (moved[r]) or whose validity ran out (valid_until[r] <= as_of), new rows apart (fresh[r]: as of now already),
 * become dirty; the dirty rows get their as-of columns at as_of (kept_rows_as_of_at's arithmetic), are scored
 * (each float64 value cast to float32 as the Python path's astype does, the margin summed as tree_eval_margin
 * does, XGBoost's float32 sigmoid when logistic, stored as double) and get a new validity from their own paths
 * (path_validity); the top k rows by (score desc, degree desc, id asc) go to top (ranking_order's order; NaN last,
 * as numpy sorts it) and get their as-of columns at as_of (what the reasons read). Returns how many rows were
 * scored.
 * model (int64): taus, thresholds, offsets, key, threshold, leaf (addresses), n_trees, depth, the base margin's
 * float32 bits, logistic, stride (== the trees' n_features), col_activity, col_recency, col_degree, bounds (the
 * address of path_validity's per-leaf table). query_*: the query's held 7-day count, anchor and whether known.
 * list (int64 addresses of the entry's arrays): values (n x 3), anchors, known, latest, has_view, x (n x stride),
 * valid_until, scores, ids. */
static inline int ranks_before(double sa, double da, int64_t ia, double sb, double db, int64_t ib) {
    int na = sa != sa, nb = sb != sb;
    if (na != nb) return nb;
    if (!na && sa != sb) return sa > sb;
    na = da != da, nb = db != db;
    if (na != nb) return nb;
    if (!na && da != db) return da > db;
    return ia < ib;
}

/* A scored row's validity from the leaves it reached: a tree's leaf stands while every comparison on the path to
 * it keeps its outcome, so only the thresholds of the row's own paths matter (the bound over every threshold of a
 * column, as_of_row's, is tighter: a threshold off the path moves nothing). bounds[(t << D) + leaf] holds 8 float32
 * per leaf of tree t: for the three decaying counts and the query's 7-day count the largest threshold the path went
 * right of (x >= t: the count falls below it at anchor + tau ln(held / t); -inf: none), for the days since, the
 * recency and the query's days since the smallest threshold the path went left of, negated (so that every lane is a
 * maximum: one vector max a tree; reached at base + t' DAY, t' the float32 just below t; -inf: none), and a -inf
 * pad. The arithmetic and margins are as_of_row's; a column that is NaN (never
 * connected, no view) stays so until the row moves. query: the query's held 7-day count, its anchor, whether
 * known (its activity moving re-scores every row: the caller's). */
static inline int64_t falling_until(double held, double anchor, int64_t tau, float t, int64_t u) {
    if (t > 0 && held > 0) {
        double span = (double)tau * log(held / (double)t);
        int64_t at = (int64_t)floor(anchor + span - 1.0 - 1e-9 * fabs(span));
        if (at < u) u = at;
    }
    return u;
}

static inline int64_t growing_until(double base, float t, int64_t u) {
    if (t < INFINITY) {
        double span = (double)nextafterf(t, -INFINITY) * 86400000.0;
        int64_t at = (int64_t)floor(base + span - 1.0 - 1e-9 * span);
        if (at < u) u = at;
    }
    return u;
}

static int64_t path_validity(const int32_t *leaves, int64_t i, int32_t n_trees, int32_t depth, const float *bounds,
                             const double *held, int64_t anchor_ms, uint8_t is_known, int64_t latest,
                             uint8_t viewed, const int64_t *taus, double query_held, int64_t query_anchor,
                             int query_known) {
    float most[8];
#if defined(__AVX__)
    __m256 m = _mm256_set1_ps(-INFINITY);
    for (int32_t t = 0; t < n_trees; t++)
        m = _mm256_max_ps(m, _mm256_loadu_ps(bounds + (((int64_t)t << depth) + leaves[(int64_t)t * BLOCK + i]) * 8));
    _mm256_storeu_ps(most, m);
#else
    for (int j = 0; j < 8; j++) most[j] = -INFINITY;
    for (int32_t t = 0; t < n_trees; t++) {
        const float *b = bounds + (((int64_t)t << depth) + leaves[(int64_t)t * BLOCK + i]) * 8;
        for (int j = 0; j < 8; j++) most[j] = b[j] > most[j] ? b[j] : most[j];
    }
#endif
    const float *lo = most, hi[3] = {-most[4], -most[5], -most[6]};
    int64_t u = INT64_MAX;
    double anchor = (double)anchor_ms;
    if (is_known) {  /* never connected: counts 0 and days since NaN, which stay so until the row's activity moves */
        for (int j = 0; j < 3; j++) u = falling_until(held[j], anchor, taus[j], lo[j], u);
        u = growing_until(anchor, hi[0], u);
    }
    if (viewed) u = growing_until((double)latest, hi[1], u);
    if (query_known) {
        u = falling_until(query_held, (double)query_anchor, taus[1], lo[3], u);
        u = growing_until((double)query_anchor, hi[2], u);
    }
    return u;
}

int64_t kept_rows_update(const int64_t *model, const int64_t *list, int64_t n, uint8_t *dirty,
                         const uint8_t *moved, const uint8_t *fresh, int64_t as_of, int64_t k, int64_t *top,
                         double query_held, int64_t query_anchor, int32_t query_known) {
    const int64_t *taus = (const int64_t *)model[0];
    const double *thresholds = (const double *)model[1];
    const int64_t *offsets = (const int64_t *)model[2];
    const int32_t *key = (const int32_t *)model[3];
    const float *threshold = (const float *)model[4];
    const float *leaf = (const float *)model[5];
    const int32_t n_trees = (int32_t)model[6], depth = (int32_t)model[7];
    float base;
    int32_t base_bits = (int32_t)model[8];
    memcpy(&base, &base_bits, sizeof base);
    const int logistic = (int)model[9];
    const int64_t stride = model[10], col_activity = model[11], col_recency = model[12], col_degree = model[13];
    const float *bounds = (const float *)model[14];
    const double *values = (const double *)list[0];
    const int64_t *anchors = (const int64_t *)list[1];
    const uint8_t *known = (const uint8_t *)list[2];
    const int64_t *latest = (const int64_t *)list[3];
    const uint8_t *has_view = (const uint8_t *)list[4];
    double *x = (double *)list[5];
    int64_t *valid_until = (int64_t *)list[6];
    double *scores = (double *)list[7];
    const int64_t *ids = (const int64_t *)list[8];
    /* the as-of columns of the rows that moved, ran out or are dirty (scored below: at as_of, as the steps do; their
     * validity is their paths', once scored) */
    for (int64_t r = 0; r < n; r++) {
        if (fresh[r] || !(moved[r] || dirty[r] || valid_until[r] <= as_of)) continue;
        as_of_into(r, values, anchors, known, latest, has_view, as_of, taus, thresholds, offsets, x, stride,
                   col_activity, col_recency, NULL);
        dirty[r] = 1;
    }
    /* the dirty rows scored, BLOCK at a time, with their paths' validity */
    float acc[BLOCK];
    float xb[stride * BLOCK];
    int64_t rows[BLOCK];
    int32_t *leaves = malloc(sizeof(int32_t) * BLOCK * (size_t)(n_trees > 0 ? n_trees : 1));
    if (leaves == NULL) return -1;
    int64_t scored = 0, m = 0;
    for (int64_t r = 0; r <= n; r++) {
        if (r < n && dirty[r]) rows[m++] = r;
        if (m == BLOCK || (r == n && m > 0)) {
            for (int64_t i = 0; i < BLOCK; i++) {
                acc[i] = base;
                const double *row = x + (i < m ? rows[i] : 0) * stride;
                for (int64_t f = 0; f < stride; f++) xb[f * BLOCK + i] = i < m ? (float)row[f] : 0.0f;
            }
            margin_block(xb, m, key, threshold, leaf, n_trees, depth, acc, leaves);
            for (int64_t i = 0; i < m; i++) {
                int64_t s = rows[i];
                scores[s] = logistic ? (double)(1.0f / (1.0f + expf(-acc[i]))) : (double)acc[i];
                valid_until[s] = path_validity(leaves, i, n_trees, depth, bounds, values + 3 * s, anchors[s], known[s],
                                               latest[s], has_view[s], taus, query_held, query_anchor, query_known);
            }
            scored += m;
            m = 0;
        }
    }
    free(leaves);
    /* the top k, kept sorted by insertion (k is small against n) */
    int64_t count = 0;
    for (int64_t r = 0; r < n && k > 0; r++) {
        double s = scores[r];
        if (count == k && s < scores[top[k - 1]]) continue;  /* most rows: no read of their degree */
        double d = x[r * stride + col_degree];
        if (count == k) {
            int64_t last = top[k - 1];
            if (!ranks_before(s, d, ids[r], scores[last], x[last * stride + col_degree], ids[last])) continue;
        }
        int64_t at = count < k ? count++ : k - 1;
        while (at > 0) {
            int64_t above = top[at - 1];
            if (!ranks_before(s, d, ids[r], scores[above], x[above * stride + col_degree], ids[above])) break;
            top[at] = above;
            at--;
        }
        top[at] = r;
    }
    /* the shown rows' as-of columns at as_of (a row scored above is recomputed to the same bits) */
    for (int64_t i = 0; i < count; i++)
        as_of_into(top[i], values, anchors, known, latest, has_view, as_of, taus, thresholds, offsets, x, stride,
                   col_activity, col_recency, NULL);
    return scored;
}

/* The common neighbours' structure columns of one list (ranking/features.py structure_columns, whose docstring
 * defines them), in one pass over the user's 2-paths instead of numpy's sorts and scatter passes: ~0.4 ms of a
 * 2,000-row list there. Bit for bit numpy's: the counts are integers, min and max exact, and the two float sums
 * add one term per 2-path in the order of `others`, as np.bincount does. A candidate id listed twice gets its
 * paths on its first row (numpy's stable argsort + searchsorted do the same).
 * ids: n candidates; middles (ascending), sizes: the user's m neighbours and their degrees; others: their
 * neighbours, run after run; band_upper: the degree bands' upper ends; out: n rows of `stride` doubles, the
 * 4 + 4 columns written from column 0 (the caller points it at the first structure column).
 * Returns 0, or -1 when the scratch memory could not be allocated (the caller then computes them in numpy). */
static inline uint64_t id_hash(int64_t id, int shift) {
    return ((uint64_t)id * 0x9E3779B97F4A7C15ULL) >> shift;
}

/* An open-addressing table id -> first row holding it (linear probing, at most half full). */
static int64_t *id_table(const int64_t *keys, int64_t n, int64_t **rows_out, int *shift_out, int64_t *mask_out) {
    int bits = 4;
    while (((int64_t)1 << bits) < 2 * n) bits++;
    int64_t size = (int64_t)1 << bits, mask = size - 1;
    int64_t *table = malloc(sizeof(int64_t) * 2 * size); /* key, row (-1: empty) */
    if (table == NULL) return NULL;
    for (int64_t s = 0; s < size; s++) table[2 * s + 1] = -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = (int64_t)id_hash(keys[i], 64 - bits);
        while (table[2 * s + 1] >= 0 && table[2 * s] != keys[i]) s = (s + 1) & mask;
        if (table[2 * s + 1] < 0) { table[2 * s] = keys[i]; table[2 * s + 1] = i; }
    }
    *rows_out = table;
    *shift_out = 64 - bits;
    *mask_out = mask;
    return table;
}

static inline int64_t id_row(const int64_t *table, int shift, int64_t mask, int64_t key) {
    int64_t s = (int64_t)id_hash(key, shift);
    while (table[2 * s + 1] >= 0) {
        if (table[2 * s] == key) return table[2 * s + 1];
        s = (s + 1) & mask;
    }
    return -1;
}

int structure_columns(int64_t n, const int64_t *ids, int64_t m, const int64_t *middles, const int64_t *sizes,
                      const int64_t *others, const int64_t *band_upper, int32_t n_upper, double *out, int64_t stride) {
    const int bands = n_upper + 1;
    for (int64_t i = 0; i < n; i++) {
        double *row = out + i * stride;
        for (int c = 0; c < bands + 4; c++) row[c] = 0.0;
        row[bands] = INFINITY;
        row[bands + 1] = -INFINITY;
    }
    int64_t *candidates = NULL, *circle = NULL;
    int candidate_shift = 0, circle_shift = 0;
    int64_t candidate_mask = 0, circle_mask = 0;
    double *in_circle = malloc(sizeof(double) * (m > 0 ? m : 1));
    if (in_circle == NULL || id_table(ids, n, &candidates, &candidate_shift, &candidate_mask) == NULL
        || id_table(middles, m, &circle, &circle_shift, &circle_mask) == NULL) {
        free(in_circle); free(candidates); free(circle);
        return -1;
    }
    /* |N(z) and N(user)| for every neighbour z: its neighbours that are the user's */
    int64_t start = 0;
    for (int64_t z = 0; z < m; z++) {
        double count = 0.0;
        for (int64_t p = start; p < start + sizes[z]; p++)
            count += id_row(circle, circle_shift, circle_mask, others[p]) >= 0 ? 1.0 : 0.0;
        in_circle[z] = count;
        start += sizes[z];
    }
    start = 0;
    for (int64_t z = 0; z < m; z++) {
        double degree = (double)sizes[z];
        double share = sizes[z] > 0 ? in_circle[z] / degree : 0.0;
        int band = 0;
        while (band < n_upper && band_upper[band] < sizes[z]) band++;
        for (int64_t p = start; p < start + sizes[z]; p++) {
            int64_t r = id_row(candidates, candidate_shift, candidate_mask, others[p]);
            if (r < 0) continue;
            double *row = out + r * stride;
            row[band] += 1.0;
            if (degree < row[bands]) row[bands] = degree;
            if (degree > row[bands + 1]) row[bands + 1] = degree;
            row[bands + 2] += in_circle[z];
            row[bands + 3] += share;
        }
        start += sizes[z];
    }
    for (int64_t i = 0; i < n; i++) {
        double *row = out + i * stride;
        if (row[bands] == INFINITY) { row[bands] = NAN; row[bands + 1] = NAN; }
    }
    free(in_circle); free(candidates); free(circle);
    return 0;
}
