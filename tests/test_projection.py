import subprocess
import sys

import pytest
import torch

from verakit.projection import Projection, distribution_scale, matrix_ids, philox4x32, unit_table

# Random123 known-answer vectors for Philox4x32-10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0 << 32 | 0xA4093822,
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    out = philox4x32(torch.tensor([ctr[0]]), torch.tensor([ctr[1]]), ctr[2], ctr[3], key)
    assert tuple(int(w) for w in out) == expected


# Golden values: row 0, columns 0..4, and element (2, 4) of the 3x5 table at seed 0.
GOLDEN = {
    ("kaiming_uniform", 0): ([-0.20190715789794922, 0.7610403299331665, 0.47142553329467773,
                              0.21096360683441162, 0.9444823265075684], 0.5425490140914917),
    ("kaiming_uniform", 1): ([0.033358216285705566, 0.8793160915374756, -0.8820266723632812,
                              0.03101980686187744, 0.5819385051727295], -0.9683487415313721),
    ("kaiming_normal", 0): ([-0.25581595301628113, 0.6301836371421814, 1.9148032665252686,
                             0.5070237517356873, -2.0652554035186768], -1.0678850412368774),
    ("uniform", 1): ([0.5166791081428528, 0.9396580457687378, 0.058986663818359375,
                      0.5155099034309387, 0.7909692525863647], 0.015825629234313965),
}


@pytest.mark.parametrize("key", list(GOLDEN))
def test_golden_values(key):
    dist, mid = key
    row0, e24 = GOLDEN[key]
    t = unit_table(0, mid, dist, 3, 5)
    assert torch.equal(t[0], torch.tensor(row0, dtype=torch.float32))
    assert t[2, 4].item() == e24


def test_large_table_checksum():
    t = unit_table(12345, 0, "kaiming_uniform", 1024, 4096)
    assert t.double().sum().item() == pytest.approx(972.6151238679886, abs=0)
    assert t[1023, 4095].item() == -0.856762170791626


@pytest.mark.parametrize("dist", ["kaiming_uniform", "kaiming_normal", "uniform"])
def test_prefix_property_across_shapes(dist):
    big = unit_table(7, 0, dist, 40, 103)
    for rows, cols in [(1, 1), (3, 5), (17, 64), (40, 101), (5, 103)]:
        assert torch.equal(unit_table(7, 0, dist, rows, cols), big[:rows, :cols])


def test_seed_and_matrix_change_values():
    a = unit_table(0, 0, "kaiming_uniform", 8, 8)
    assert not torch.equal(a, unit_table(1, 0, "kaiming_uniform", 8, 8))
    assert not torch.equal(a, unit_table(0, 1, "kaiming_uniform", 8, 8))
    assert not torch.equal(a, unit_table(2**40, 0, "kaiming_uniform", 8, 8))  # high key word counts


def test_distribution_statistics():
    u = unit_table(3, 0, "kaiming_uniform", 256, 1024)
    assert u.min() >= -1 and u.max() < 1
    assert abs(u.mean().item()) < 0.01 and u.std().item() == pytest.approx(3**-0.5, rel=0.01)
    n = unit_table(3, 0, "kaiming_normal", 256, 1024)
    assert abs(n.mean().item()) < 0.01 and n.std().item() == pytest.approx(1.0, rel=0.01)
    assert (n.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.001)
    p = unit_table(3, 0, "uniform", 256, 1024) * distribution_scale("uniform", 1024)
    assert p.min() >= 0 and p.max() < 0.1 and p.mean().item() == pytest.approx(0.05, abs=0.001)


def test_scales():
    assert distribution_scale("kaiming_uniform", 6) == 1.0
    assert distribution_scale("kaiming_normal", 2) == 1.0
    proj = Projection(0, "kaiming_uniform", 16, 24, 32)
    assert proj.scale(24, 16) == pytest.approx((6 / 24) ** 0.5 * (6 / 16) ** 0.5)


def test_identical_across_thread_counts():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = unit_table.__wrapped__(5, 1, "kaiming_normal", 64, 200)
        torch.set_num_threads(2)
        two = unit_table.__wrapped__(5, 1, "kaiming_normal", 64, 200)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_identical_in_fresh_subprocess():
    code = (
        "import torch; from verakit.projection import unit_table;"
        "t = torch.cat([unit_table(9, 0, d, 33, 77).flatten() for d in ('kaiming_uniform','kaiming_normal','uniform')]);"
        "print(t.double().sum().item().hex(), t.view(torch.int32).long().sum().item())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    t = torch.cat([unit_table(9, 0, d, 33, 77).flatten() for d in ("kaiming_uniform", "kaiming_normal", "uniform")])
    assert out == [t.double().sum().item().hex(), str(t.view(torch.int32).long().sum().item())]


def test_unique_matrix_ids_are_stable_and_distinct():
    a = matrix_ids("unique", "encoder.layer.0.query")
    assert a == matrix_ids("unique", "encoder.layer.0.query")
    assert a != matrix_ids("unique", "encoder.layer.1.query") and a[0] != a[1]
    assert matrix_ids("shared") == (0, 1)


def test_projection_tables_cached_per_device_dtype():
    proj = Projection(0, "kaiming_uniform", 8, 16, 12)
    a1, _ = proj.tables(torch.device("cpu"), torch.float16)
    a2, _ = proj.tables(torch.device("cpu"), torch.float16)
    assert a1 is a2 and a1.dtype == torch.float16
    assert proj.A.shape == (8, 16) and proj.B.shape == (12, 8)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown projection distribution"):
        unit_table(0, 0, "gaussian", 2, 2)
    with pytest.raises(ValueError, match="rows, cols >= 1"):
        unit_table(0, 0, "uniform", 0, 2)
