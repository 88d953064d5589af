import matplotlib
import numpy as np
import pytest
import torch

from textimg.viz import image_grid, plot_curves, plot_heatmap, show_images, to_unit

matplotlib.use("Agg")


def test_to_unit_maps_ranges():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    assert to_unit(x).tolist() == [0.0, 0.5, 1.0, 1.0]
    assert to_unit(x, value_range=(0, 1)).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_image_grid_layout():
    images = torch.zeros(5, 3, 8, 8)
    images[1] = 1.0  # one white image
    grid = image_grid(images, nrow=4, padding=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 + 2 * 10, 2 + 4 * 10, 3)
    assert grid[2:10, 12:20].min() == 255  # the white image is second in the first row
    assert grid[2:10, 2:10].max() == 128  # a zero image in [-1, 1] is mid-grey
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        image_grid(torch.zeros(3, 8, 8))


def test_figures_build():
    import matplotlib.pyplot as plt

    fig = show_images(torch.rand(3, 3, 8, 8) * 2 - 1, captions=["a", "b", "c"], nrow=3)
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        show_images(torch.rand(3, 3, 8, 8), captions=["a", "b"])
    fig2 = plot_heatmap(torch.eye(3), ["x", "y", "z"])
    fig3 = plot_curves({"loss": [3, 2, 1]})
    for f in (fig, fig2, fig3):
        plt.close(f)
