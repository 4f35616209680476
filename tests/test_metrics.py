"""spformer.eval.metrics, against two independent oracles.

1. Hand-computed values on tiny label maps written out in each test (the arithmetic is in the comments),
   with boundaries in both orientations (rows and columns), diagonals and corners, every tolerance
   (0, 1, 2 px) and the exact edge of the tolerance window.
2. Brute-force reference implementations written here from the definitions in the module docstring
   and docs/design.md §3 (plain double loops over pixels, dicts of counts; nothing from the code under
   test), compared with the library on random small label maps.

The boundary conventions tested (module docstring, docs/design.md): a boundary pixel has a
4-neighbour with another label (both sides of a boundary, the image border is no boundary); a
ground-truth boundary pixel is recalled when a segment boundary pixel lies in the (2r+1)x(2r+1)
window around it, i.e. at Chebyshev distance <= r (not a Euclidean disk), the window clipped at the
image border (no wrap-around, no reflection); ignored ground-truth pixels are a region of their own
but never ground-truth boundary pixels.
"""
import math
from collections import Counter

import numpy as np
import pytest

from spformer.eval.metrics import (
    InputError, achievable_segmentation_accuracy, boundary_map, boundary_recall, compactness,
    mean_iou_and_accuracy, num_segments, oracle_confusion, score_segmentation, undersegmentation_error)

NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


# ---------------------------------------------------------------------------------------------
# Brute-force references (double loops over pixels)
# ---------------------------------------------------------------------------------------------

def ref_boundary_map(labels):
    labels = np.asarray(labels)
    H, W = labels.shape
    out = np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            for dy, dx in NEIGHBOURS:
                v, u = y + dy, x + dx
                if 0 <= v < H and 0 <= u < W and labels[v, u] != labels[y, x]:
                    out[y, x] = True
    return out


def ref_boundary_recall(segments, gt, tolerance, ignore_index=255):
    gt_b, seg_b = ref_boundary_map(gt), ref_boundary_map(segments)
    H, W = gt.shape
    seg_points = [(y, x) for y in range(H) for x in range(W) if seg_b[y, x]]
    hits = total = 0
    for y in range(H):
        for x in range(W):
            if not gt_b[y, x] or (ignore_index is not None and gt[y, x] == ignore_index):
                continue
            total += 1
            # Chebyshev distance: the (2r+1)x(2r+1) window, nothing outside the image
            if any(max(abs(y - v), abs(x - u)) <= tolerance for v, u in seg_points):
                hits += 1
    return hits / total if total else math.nan


def _overlaps(segments, gt, ignore_index):
    """{segment: Counter{region: pixels}} over the non-ignored pixels, and N."""
    table, n = {}, 0
    H, W = gt.shape
    for y in range(H):
        for x in range(W):
            g = int(gt[y, x])
            if ignore_index is not None and g == ignore_index:
                continue
            table.setdefault(int(segments[y, x]), Counter())[g] += 1
            n += 1
    return table, n


def ref_asa(segments, gt, ignore_index=255):
    table, n = _overlaps(segments, gt, ignore_index)
    return sum(max(c.values()) for c in table.values()) / n if n else math.nan


def ref_ue(segments, gt, ignore_index=255):
    table, n = _overlaps(segments, gt, ignore_index)
    if not n:
        return math.nan
    charged = 0
    for counts in table.values():
        size = sum(counts.values())  # |S_j| without its ignored pixels
        for inside in counts.values():  # only regions the segment touches
            charged += min(inside, size - inside)
    return charged / n


def ref_oracle_confusion(segments, gt, ignore_index=255):
    table, _ = _overlaps(segments, gt, ignore_index)
    out = Counter()
    for counts in table.values():
        best = max(counts.values())
        majority = min(label for label, c in counts.items() if c == best)  # ties to the smallest label
        for label, c in counts.items():
            out[label, majority] += c
    return out


def ref_miou_macc(confusion):
    classes = sorted({t for t, _ in confusion} | {p for _, p in confusion})
    if not classes:
        return math.nan, math.nan
    ious, accs = [], []
    for c in classes:
        tp = confusion.get((c, c), 0)
        fn = sum(n for (t, p), n in confusion.items() if t == c and p != c)
        fp = sum(n for (t, p), n in confusion.items() if p == c and t != c)
        ious.append(tp / (tp + fp + fn))
        if tp + fn:
            accs.append(tp / (tp + fn))
    return sum(ious) / len(ious), sum(accs) / len(accs)


def ref_compactness(segments):
    segments = np.asarray(segments)
    H, W = segments.shape
    area, perimeter = Counter(), Counter()
    for y in range(H):
        for x in range(W):
            s = int(segments[y, x])
            area[s] += 1
            for dy, dx in NEIGHBOURS:  # every pixel edge on the outline, the image border included
                v, u = y + dy, x + dx
                if not (0 <= v < H and 0 <= u < W) or segments[v, u] != s:
                    perimeter[s] += 1
    n = H * W
    return sum(area[s] / n * 4 * math.pi * area[s] / perimeter[s] ** 2 for s in area)


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# boundary_map
# ---------------------------------------------------------------------------------------------

def test_boundary_map_marks_both_sides_of_a_horizontal_boundary():
    # Rows 0-1 label 0, rows 2-3 label 1: rows 1 and 2 are boundary pixels, rows 0 and 3 are not.
    labels = np.array([[0, 0, 0]] * 2 + [[1, 1, 1]] * 2)
    expected = np.array([[0, 0, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]], bool)
    assert np.array_equal(boundary_map(labels), expected)
    # The same split turned by 90 degrees: columns 1 and 2.
    assert np.array_equal(boundary_map(labels.T), expected.T)


def test_boundary_map_staircase_plus_and_checkerboard():
    # Hand-checked pixel by pixel: (0,2) sees only 1s, (1,0), (2,0), (2,1) see only 0s.
    stair = np.array([[0, 1, 1],
                      [0, 0, 1],
                      [0, 0, 0]])
    assert boundary_map(stair).astype(int).tolist() == [[1, 1, 0],
                                                        [0, 1, 1],
                                                        [0, 0, 1]]
    # One odd pixel: it and its 4 neighbours (a plus); the diagonal corners touch it only at a corner.
    dot = np.zeros((3, 3), int)
    dot[1, 1] = 7
    assert boundary_map(dot).astype(int).tolist() == [[0, 1, 0],
                                                      [1, 1, 1],
                                                      [0, 1, 0]]
    # A checkerboard: every pixel differs from every 4-neighbour.
    assert boundary_map(np.indices((3, 4)).sum(0) % 2).all()


def test_boundary_map_image_border_is_no_boundary():
    assert not boundary_map(np.zeros((4, 5), int)).any()
    assert not boundary_map(np.full((1, 1), 3)).any()
    # One row / one column: only the horizontal or vertical neighbours exist.
    assert boundary_map(np.array([[0, 0, 1, 1, 1]])).astype(int).tolist() == [[0, 1, 1, 0, 0]]
    assert boundary_map(np.array([[0], [0], [1]])).astype(int).ravel().tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------------------------
# boundary_recall: tolerance window, orientation, borders, ignore label
# ---------------------------------------------------------------------------------------------

def _row_split(H, W, row):
    labels = np.zeros((H, W), np.int64)
    labels[row:] = 1
    return labels


@pytest.mark.parametrize('transpose', [False, True], ids=['rows', 'columns'])
@pytest.mark.parametrize('tolerance', [0, 1, 2])
def test_boundary_recall_of_a_shifted_straight_boundary(tolerance, transpose):
    # Ground truth split above row 5: boundary rows {4, 5}. Segments split above row 5 + d: rows
    # {4 + d, 5 + d}. Between full-width rows the Chebyshev distance is the row difference, so ground
    # truth row r is recalled iff min(|r - (4 + d)|, |r - (5 + d)|) <= tolerance; each row is half.
    H, W = 12, 7
    gt = _row_split(H, W, 5)
    for d in range(-3, 5):
        seg = _row_split(H, W, 5 + d)
        hits = [min(abs(r - (4 + d)), abs(r - (5 + d))) <= tolerance for r in (4, 5)]
        expected = sum(hits) / 2
        got = boundary_recall(seg.T if transpose else seg, gt.T if transpose else gt, tolerance=tolerance)
        assert got == expected, (d, tolerance)
    # The edge of the window spelled out: d = t + 1 puts row 5 at distance t (counted) and row 4 at
    # t + 1 (not counted); d = t + 2 puts both beyond.
    seg = _row_split(H, W, 5 + tolerance + 1)
    args = (seg.T, gt.T) if transpose else (seg, gt)
    assert boundary_recall(*args, tolerance=tolerance) == 0.5
    seg = _row_split(H, W, 5 + tolerance + 2)
    args = (seg.T, gt.T) if transpose else (seg, gt)
    assert boundary_recall(*args, tolerance=tolerance) == 0.0


def _one_gt_boundary_pixel(H, W, p):
    """Ground truth with exactly one boundary pixel, p: label 0 there, everything else ignored (255)."""
    gt = np.full((H, W), 255, np.int64)
    gt[p] = 0
    return gt


def _one_pixel_segment(H, W, q):
    """Segments whose boundary pixels are the plus around q: q and its 4-neighbours (inside the image)."""
    seg = np.zeros((H, W), np.int64)
    seg[q] = 1
    return seg


# (offset of the ground-truth pixel from q, tolerance, recalled). The segment boundary is the plus
# around q, so the Chebyshev distance of q + (a, b) is min over the plus of max(|dy|, |dx|):
#   diagonal (d, d): d (q itself, and q + (1, 0) is at (d - 1, d)); Euclidean distance of the
#   nearest plus pixel would be sqrt((d - 1)^2 + d^2) = sqrt(5) > 2 for d = 2.
#   axis (d, 0): d - 1 (through q + (1, 0)).
#   knight (2, 1): 1 (through q + (1, 0) at (1, 1)); (3, 1): 2.
WINDOW_CASES = [
    ((0, 0), 0, True), ((1, 0), 0, True), ((1, 1), 0, False),
    ((1, 1), 1, True), ((2, 2), 1, False), ((2, 0), 1, True), ((3, 0), 1, False),
    ((2, 2), 2, True), ((3, 3), 2, False), ((3, 0), 2, True), ((4, 0), 2, False),
    ((2, 1), 1, True), ((3, 1), 1, False), ((3, 1), 2, True), ((3, 2), 2, True), ((4, 1), 2, False),
]


@pytest.mark.parametrize('offset,tolerance,recalled', WINDOW_CASES)
def test_boundary_recall_window_is_a_chebyshev_square(offset, tolerance, recalled):
    # Every direction (the 8 sign/axis permutations of the offset) gives the same answer.
    H = W = 13
    q = (6, 6)
    a, b = offset
    for dy, dx in {(a, b), (b, a), (-a, b), (a, -b), (-a, -b), (-b, a), (b, -a), (-b, -a)}:
        gt = _one_gt_boundary_pixel(H, W, (q[0] + dy, q[1] + dx))
        seg = _one_pixel_segment(H, W, q)
        assert boundary_recall(seg, gt, tolerance=tolerance) == float(recalled), (dy, dx)


def test_boundary_recall_window_is_clipped_at_the_image_border():
    H, W = 6, 9
    # No wrap-around: a ground-truth pixel in column 0 is far (W - 2) from a boundary in columns 7/8.
    seg = np.zeros((H, W), np.int64)
    seg[:, 8] = 1
    gt = _one_gt_boundary_pixel(H, W, (3, 0))
    assert boundary_recall(seg, gt, tolerance=2) == 0.0
    # ... and in column 7 it is on it.
    assert boundary_recall(seg, _one_gt_boundary_pixel(H, W, (3, 7)), tolerance=0) == 1.0
    # Corners: the window around (0, 0) holds rows/columns 0..2 only; the plus around (2, 3) reaches
    # (2, 2) at distance 2.
    corner = _one_gt_boundary_pixel(H, W, (0, 0))
    assert boundary_recall(_one_pixel_segment(H, W, (2, 3)), corner, tolerance=2) == 1.0
    assert boundary_recall(_one_pixel_segment(H, W, (3, 3)), corner, tolerance=2) == 0.0
    # No wrap-around vertically either: row 0 is far from a boundary in rows H-2/H-1.
    bottom = _row_split(H, W, H - 1)
    assert boundary_recall(bottom, _one_gt_boundary_pixel(H, W, (0, 4)), tolerance=2) == 0.0
    assert boundary_recall(bottom, _one_gt_boundary_pixel(H, W, (H - 3, 4)), tolerance=1) == 1.0
    # A segment map with one label has no boundary, not even along the image border.
    assert boundary_recall(np.zeros((H, W), np.int64), _row_split(H, W, 3), tolerance=2) == 0.0


def test_boundary_recall_with_a_horizontal_void_band():
    # Rows 0-1 label 1, row 2 void (255), rows 3-4 label 2: the ground-truth boundary pixels are rows 1
    # and 3 (6 px; row 2 is ignored). Segments split above row 3: boundary rows 2 and 3.
    gt = np.array([[1, 1, 1]] * 2 + [[255, 255, 255]] + [[2, 2, 2]] * 2)
    seg = _row_split(5, 3, 3)
    assert boundary_recall(seg, gt, tolerance=0) == 0.5   # row 3 only
    assert boundary_recall(seg, gt, tolerance=1) == 1.0   # row 1 is 1 px from row 2
    # Without an ignore label, 255 is a region: row 2 is boundary too, and recalled at tolerance 0.
    assert boundary_recall(seg, gt, tolerance=0, ignore_index=None) == pytest.approx(6 / 9)
    # Another ignore value: 255 is an ordinary region again, and label 1 is skipped; boundary
    # pixels: rows 2 and 3 (row 1 is ignored), both on the segment boundary.
    assert boundary_recall(seg, gt, tolerance=0, ignore_index=1) == 1.0


def test_boundary_recall_is_not_symmetric():
    # Ground truth: 8x8 split between columns 3|4 (boundary columns 3, 4: 16 px). Segments: splits at
    # 1|2, 3|4, 5|6 (boundary columns 1-6: 48 px). Every ground-truth boundary pixel is on a segment
    # boundary (recall 1), but the segments' boundary would be only 16 of 48 recalled the other way.
    gt = np.zeros((8, 8), np.int64)
    gt[:, 4:] = 1
    seg = np.arange(8)[None, :].repeat(8, 0) // 2
    assert boundary_recall(seg, gt, tolerance=0) == 1.0
    assert boundary_recall(gt, seg, tolerance=0) == pytest.approx(16 / 48)
    # At tolerance 1 columns 1 and 6 are still 2 px from columns 3/4.
    assert boundary_recall(gt, seg, tolerance=1) == pytest.approx(32 / 48)
    # ASA and UE are not symmetric either: the finer map is perfect for the coarser one (ASA 1, UE 0),
    # but each 32-px half covers two 16-px quarters the other way: ASA 32 / 64, UE 4 * min(16, 16) / 64.
    assert achievable_segmentation_accuracy(seg, gt) == 1.0
    assert achievable_segmentation_accuracy(gt, seg) == 0.5
    assert undersegmentation_error(seg, gt) == 0.0
    assert undersegmentation_error(gt, seg) == 1.0


def test_boundary_recall_undefined_and_bad_tolerance():
    assert math.isnan(boundary_recall(_row_split(4, 4, 2), np.ones((4, 4), np.int64)))
    assert math.isnan(boundary_recall(_row_split(4, 4, 2), np.full((4, 4), 255)))  # all ignored
    with pytest.raises(InputError, match='tolerance must be >= 0'):
        boundary_recall(_row_split(4, 4, 2), _row_split(4, 4, 2), tolerance=-1)
    with pytest.raises(InputError, match='same size'):
        boundary_recall(np.zeros((4, 4)), np.zeros((4, 5)))


# ---------------------------------------------------------------------------------------------
# ASA, UE, oracle confusion, mIoU/mAcc with an ignore label
# ---------------------------------------------------------------------------------------------

GT = np.array([[1, 1, 2, 2],
               [1, 255, 2, 2],
               [3, 3, 3, 255]])
SEG = np.array([[0, 0, 0, 1],
                [0, 0, 1, 1],
                [2, 2, 1, 1]])
# Non-ignored overlaps: segment 0 = {1: 3, 2: 1} (+1 void), segment 1 = {2: 3, 3: 1} (+1 void),
# segment 2 = {3: 2}; N = 10.


def test_asa_and_ue_by_hand_with_and_without_the_ignore_label():
    # ASA: (3 + 3 + 2) / 10. UE: segment 0 charges min(3, 1) + min(1, 3), segment 1 the same,
    # segment 2 min(2, 0): 4 / 10.
    assert achievable_segmentation_accuracy(SEG, GT) == pytest.approx(0.8)
    assert undersegmentation_error(SEG, GT) == pytest.approx(0.4)
    # No ignore label: 255 is a region, N = 12. Segment 0 = {1: 3, 2: 1, 255: 1} of 5 charges
    # min(3, 2) + min(1, 4) + min(1, 4) = 4, segment 1 the same, segment 2 nothing.
    assert achievable_segmentation_accuracy(SEG, GT, ignore_index=None) == pytest.approx(8 / 12)
    assert undersegmentation_error(SEG, GT, ignore_index=None) == pytest.approx(8 / 12)
    # Transposed maps give the same values (nothing depends on the orientation).
    assert achievable_segmentation_accuracy(SEG.T, GT.T) == pytest.approx(0.8)
    assert undersegmentation_error(SEG.T, GT.T) == pytest.approx(0.4)
    # All pixels ignored: undefined.
    assert math.isnan(achievable_segmentation_accuracy(SEG, np.full(SEG.shape, 255)))
    assert math.isnan(undersegmentation_error(SEG, np.full(SEG.shape, 255)))


def test_ue_charges_the_smaller_side_of_each_leak():
    # One segment over a 1-px region and a 5-px one (6 px): each region charges min(inside, outside),
    # min(1, 5) + min(5, 1) = 2 of 6 (not the larger side: 10; not inside: 6).
    gt = np.array([[1, 2, 2, 2, 2, 2]])
    assert undersegmentation_error(np.zeros_like(gt), gt) == pytest.approx(2 / 6)
    # Split the segment at the region boundary: no leak.
    assert undersegmentation_error(gt * 0 + (gt == 2), gt) == 0.0
    # Segments finer than the regions never leak.
    assert undersegmentation_error(np.arange(6)[None], gt) == 0.0
    # A segment lying in one region plus a void pixel does not leak (the void pixel is left out).
    gt = np.array([[1, 1, 255, 2]])
    assert undersegmentation_error(np.array([[0, 0, 0, 1]]), gt) == 0.0


def test_oracle_confusion_and_miou_by_hand():
    # Majorities: segment 0 -> 1, segment 1 -> 2, segment 2 -> 3.
    confusion = oracle_confusion(SEG, GT)
    assert confusion == Counter({(1, 1): 3, (2, 1): 1, (2, 2): 3, (3, 2): 1, (3, 3): 2})
    # IoU: 1: 3 / (3 + 4 - 3); 2: 3 / (4 + 4 - 3); 3: 2 / (3 + 2 - 2). Acc: 3/3, 3/4, 2/3.
    miou, macc = mean_iou_and_accuracy(confusion)
    assert miou == pytest.approx((3 / 4 + 3 / 5 + 2 / 3) / 3)
    assert macc == pytest.approx((1 + 3 / 4 + 2 / 3) / 3)
    # A tie goes to the smaller label value, whatever the pixel order.
    gt = np.array([[5, 5, 3, 3]])
    assert oracle_confusion(np.zeros_like(gt), gt) == Counter({(3, 3): 2, (5, 3): 2})
    assert oracle_confusion(np.zeros_like(gt), gt[:, ::-1]) == Counter({(3, 3): 2, (5, 3): 2})
    # A segment of void pixels only takes no label.
    assert oracle_confusion(np.array([[0, 1]]), np.array([[255, 4]])) == Counter({(4, 4): 1})
    assert all(math.isnan(v) for v in mean_iou_and_accuracy(Counter()))  # nothing to score


def test_mean_iou_counts_predicted_only_classes_and_acc_truth_classes_only():
    # Class 7 is predicted (2 px) but never true: IoU_7 = 0 counts, it has no accuracy.
    confusion = {(1, 1): 4, (1, 7): 2}
    miou, macc = mean_iou_and_accuracy(confusion)
    assert miou == pytest.approx((4 / 6 + 0) / 2)
    assert macc == pytest.approx(4 / 6)


# ---------------------------------------------------------------------------------------------
# Compactness and segment counts
# ---------------------------------------------------------------------------------------------

def test_compactness_by_hand():
    # Ring: label 0 around a centre pixel of label 1 (3x3). The ring has area 8 and perimeter 12 outside
    # + 4 around the hole: Q = 4 pi 8 / 16^2 = pi / 8; the centre pi / 4. CO = 8/9 pi/8 + 1/9 pi/4.
    ring = np.zeros((3, 3), np.int64)
    ring[1, 1] = 1
    assert compactness(ring) == pytest.approx(5 * math.pi / 36)
    # L-shape [[0, 0], [0, 1]]: label 0 has area 3 and perimeter 8 (Q = 3 pi / 16); label 1 is a
    # square (pi / 4). CO = 3/4 * 3 pi / 16 + 1/4 * pi / 4 = 13 pi / 64.
    ell = np.array([[0, 0], [0, 1]])
    assert compactness(ell) == pytest.approx(13 * math.pi / 64)
    # Label 0 in two pieces (1x3 [[0, 1, 0]]): area 2, perimeter 4 + 4: Q = pi / 8. CO = pi / 6.
    assert compactness(np.array([[0, 1, 0]])) == pytest.approx(math.pi / 6)
    # A 1x4 bar (area 4, perimeter 10), lying or standing: Q = 16 pi / 100.
    assert compactness(np.zeros((1, 4), np.int64)) == pytest.approx(16 * math.pi / 100)
    assert compactness(np.zeros((4, 1), np.int64)) == pytest.approx(16 * math.pi / 100)
    # Horizontal strips 2x4 in a 4x4 image: area 8, perimeter 12 each: Q = 32 pi / 144, and the
    # same for vertical strips.
    strips = _row_split(4, 4, 2)
    assert compactness(strips) == pytest.approx(32 * math.pi / 144)
    assert compactness(strips.T) == pytest.approx(32 * math.pi / 144)
    with pytest.raises(InputError, match='2-D'):
        compactness(np.zeros((2, 2, 2)))


def test_num_segments():
    assert num_segments(np.array([[5, 5], [7, 300]])) == 3
    assert num_segments(np.array([[0, 1, 0]])) == 2  # a label in two pieces is one segment


# ---------------------------------------------------------------------------------------------
# Against the brute-force references on random maps
# ---------------------------------------------------------------------------------------------

def _random_map(rng, H, W, labels):
    """Blocky random labels (boundaries sparse enough for the tolerance to matter), or pixel noise."""
    if rng.random() < 0.3:
        return rng.choice(labels, (H, W))
    by, bx = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    small = rng.choice(labels, (H // by + 1, W // bx + 1))
    return np.repeat(np.repeat(small, by, 0), bx, 1)[:H, :W]


def _random_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        H, W = int(rng.integers(1, 10)), int(rng.integers(1, 10))
        seg = _random_map(rng, H, W, np.array([0, 1, 2, 3, 40]))
        gt = _random_map(rng, H, W, np.array([0, 1, 2, 255]) if rng.random() < 0.6 else np.array([0, 1, 2]))
        yield seg, gt


def test_boundary_map_matches_the_reference():
    for seg, gt in _random_pairs(150, seed=1):
        assert np.array_equal(boundary_map(seg), ref_boundary_map(seg)), seg
        assert np.array_equal(boundary_map(gt), ref_boundary_map(gt)), gt


@pytest.mark.parametrize('tolerance', [0, 1, 2, 3])
def test_boundary_recall_matches_the_reference(tolerance):
    for seg, gt in _random_pairs(150, seed=2 + tolerance):
        for ignore in (255, None):
            got = boundary_recall(seg, gt, tolerance=tolerance, ignore_index=ignore)
            assert _same(got, ref_boundary_recall(seg, gt, tolerance, ignore)), (seg, gt, ignore)


def test_region_metrics_match_the_reference():
    for seg, gt in _random_pairs(200, seed=7):
        for ignore in (255, None):
            assert _same(achievable_segmentation_accuracy(seg, gt, ignore), ref_asa(seg, gt, ignore))
            assert _same(undersegmentation_error(seg, gt, ignore), ref_ue(seg, gt, ignore))
            confusion = oracle_confusion(seg, gt, ignore)
            assert confusion == ref_oracle_confusion(seg, gt, ignore), (seg, gt, ignore)
            miou, macc = mean_iou_and_accuracy(confusion)
            ref_miou, ref_macc = ref_miou_macc(ref_oracle_confusion(seg, gt, ignore))
            assert _same(miou, ref_miou) and _same(macc, ref_macc)
        assert compactness(seg) == pytest.approx(ref_compactness(seg), abs=1e-12)
        assert num_segments(seg) == len({int(v) for v in seg.ravel()})


def test_score_segmentation_passes_tolerance_and_ignore_label_on():
    for seg, gt in _random_pairs(60, seed=11):
        for tolerance, ignore in ((0, 255), (2, None), (1, 255)):
            scores = score_segmentation(seg, gt, ignore_index=ignore, tolerance=tolerance)
            assert _same(scores['asa'], ref_asa(seg, gt, ignore))
            assert _same(scores['undersegmentation_error'], ref_ue(seg, gt, ignore))
            assert _same(scores['boundary_recall'], ref_boundary_recall(seg, gt, tolerance, ignore))
            assert scores['confusion'] == ref_oracle_confusion(seg, gt, ignore)
