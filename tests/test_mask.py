"""Localization map to mask: thresholds, area limits, components, object masks, per-image independence."""

import pytest
import torch

from pipeline_deltadeno import connected_components, gaussian_blur, localization_map_to_mask, otsu_threshold


def make_mask(maps, object_mask=None, method="quantile", threshold=0.9, min_area=0.0, max_area=1.0, components=0,
              dilation=0, blur=0.0):
    return localization_map_to_mask(maps, object_mask, method, threshold, min_area, max_area, components, dilation,
                                    blur)


def two_blob_map(size=16):
    maps = torch.zeros(1, 1, size, size)
    maps[0, 0, 2:5, 2:5] = 1.0  # 9 pixels, mass 9
    maps[0, 0, 10:14, 10:14] = 2.0  # 16 pixels, mass 32
    return maps


def test_mask_quantile_area():
    maps = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    mask, _, empty = make_mask(maps, threshold=0.9)
    assert int(mask.sum()) == 40
    assert empty == [False]


def test_mask_absolute_threshold():
    maps = torch.linspace(0, 1, 100).view(1, 1, 10, 10)
    mask, _, _ = make_mask(maps, method="absolute", threshold=0.5)
    assert int(mask.sum()) == int((maps >= 0.5).sum())


def test_mask_otsu_separates_two_levels():
    maps = torch.zeros(1, 1, 10, 10)
    maps[0, 0, :3] = 1.0
    mask, _, _ = make_mask(maps, method="otsu")
    assert torch.equal(mask.bool(), maps.bool())


def test_otsu_threshold_between_modes():
    values = torch.cat([torch.full((50,), 0.2), torch.full((50,), 0.8)])
    assert 0.2 < otsu_threshold(values) < 0.8


def test_mask_keeps_strongest_component():
    mask, _, _ = make_mask(two_blob_map(), method="absolute", threshold=0.1, components=1)
    assert int(mask.sum()) == 16
    assert mask[0, 0, 11, 11] == 1
    assert mask[0, 0, 3, 3] == 0


def test_mask_keeps_all_components_with_zero():
    mask, _, _ = make_mask(two_blob_map(), method="absolute", threshold=0.1, components=0)
    assert int(mask.sum()) == 25


def test_mask_max_area_takes_strongest_pixels():
    maps = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    mask, _, _ = make_mask(maps, method="absolute", threshold=0.0, max_area=0.05)
    assert int(mask.sum()) == 5
    assert mask.view(-1)[-5:].all()


def test_mask_min_area_grows():
    maps = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    mask, _, _ = make_mask(maps, method="absolute", threshold=1.0, min_area=0.2)
    assert int(mask.sum()) == 20


def test_mask_dilation_grows_by_radius():
    maps = torch.zeros(1, 1, 9, 9)
    maps[0, 0, 4, 4] = 1.0
    mask, _, _ = make_mask(maps, method="absolute", threshold=0.5, dilation=1)
    assert int(mask.sum()) == 9


def test_mask_object_mask_confines_region():
    maps = two_blob_map()
    object_mask = torch.zeros_like(maps)
    object_mask[..., :8, :8] = 1
    mask, _, _ = make_mask(maps, object_mask=object_mask, method="absolute", threshold=0.1, dilation=2)
    assert int(mask.sum()) > 0
    assert int((mask * (1 - object_mask)).sum()) == 0


def test_mask_flat_map_is_empty():
    mask, normalized, empty = make_mask(torch.full((1, 1, 8, 8), 3.0))
    assert empty == [True]
    assert int(mask.sum()) == 0
    assert float(normalized.abs().sum()) == 0.0


def test_mask_nan_map_does_not_crash():
    maps = torch.full((1, 1, 8, 8), float("nan"))
    mask, _, empty = make_mask(maps)
    assert empty == [True]
    assert int(mask.sum()) == 0


def test_mask_per_image_independent_of_batch_neighbours():
    generator = torch.Generator().manual_seed(1)
    first = torch.rand(1, 1, 12, 12, generator=generator)
    second = 1000 * torch.rand(1, 1, 12, 12, generator=generator)
    alone, _, _ = make_mask(first, blur=1.0, components=1)
    together, _, _ = make_mask(torch.cat([first, second]), blur=1.0, components=1)
    assert torch.equal(alone[0], together[0])


def test_mask_normalized_map_in_unit_range():
    maps = 5 + 3 * torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    _, normalized, _ = make_mask(maps)
    assert float(normalized.min()) == 0.0
    assert float(normalized.max()) == 1.0


def test_connected_components_counts_diagonal_as_connected():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4, 4] = True
    labels = connected_components(mask)
    assert len(labels[labels > 0].unique()) == 2


def test_gaussian_blur_preserves_mass_away_from_border():
    maps = torch.zeros(1, 1, 21, 21)
    maps[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(maps, 1.5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 10, 10] < 1.0
