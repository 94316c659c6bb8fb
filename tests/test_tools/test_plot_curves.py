# Copyright (c) balanced_l1_plugin authors. All rights reserved.
import importlib.util
import json
import math
import os.path as osp

import matplotlib.image as mpimg
import numpy as np
import pytest

from balanced_l1_plugin.analysis import (figure_curves, l1_curve,
                                         regression_errors, smooth_l1_curve)

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
spec = importlib.util.spec_from_file_location(
    'plot_curves', osp.join(REPO_ROOT, 'tools', 'plot_curves.py'))
plot_curves = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_curves)

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PARAMS = [(0.5, 1.5, 1.0), (0.3, 1.5, 0.5), (1.0, 2.0, 0.11)]


def balanced_loss(x, alpha, gamma, beta):
    """The paper's Eq. (8) for threshold beta, written out by hand."""
    b = math.exp(gamma / alpha) - 1
    if x < beta:
        return alpha / b * (b * x + beta) * math.log(1 + b * x / beta) \
            - alpha * x
    return gamma * x + gamma * beta / b - alpha * beta


def balanced_grad(x, alpha, gamma, beta):
    b = math.exp(gamma / alpha) - 1
    return alpha * math.log(1 + b * x / beta) if x < beta else gamma


def line_data(ax, label):
    """x and y of the line with ``label`` in ``ax``: what was drawn."""
    for line in ax.get_lines():
        if line.get_label() == label:
            return line.get_xdata(), line.get_ydata()
    raise KeyError(label)


def check_png(path, height, width):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.shape[:2] == (height, width)
    # Not a blank canvas: lines and text leave several colours.
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 10


@pytest.mark.parametrize('alpha,gamma,beta', PARAMS)
def test_balanced_curve_passes_through_known_points(alpha, gamma, beta):
    curve, smooth, l1 = figure_curves(
        balanced=[(alpha, gamma, beta)], smooth_l1_betas=[beta])

    assert curve.x[0] == 0.0 and curve.x[-1] == pytest.approx(3 * beta)
    assert beta in curve.x
    assert curve.grad[0] == 0.0
    assert curve.loss[0] == 0.0
    outside = curve.x >= beta
    np.testing.assert_allclose(curve.grad[outside], gamma, rtol=1e-12)
    assert (curve.grad[~outside] < gamma).all()
    assert (np.diff(curve.grad) >= 0).all()
    for x in (beta / 4, beta / 2, 0.9 * beta, beta, 2 * beta):
        i = int(np.argmin(np.abs(curve.x - x)))
        assert curve.loss[i] == pytest.approx(
            balanced_loss(curve.x[i], alpha, gamma, beta), rel=1e-10)
        assert curve.grad[i] == pytest.approx(
            balanced_grad(curve.x[i], alpha, gamma, beta), rel=1e-10)


@pytest.mark.parametrize('alpha,gamma,beta', PARAMS)
def test_balanced_curve_is_continuous_at_beta(alpha, gamma, beta):
    x = np.array([beta * (1 - 1e-9), beta, beta * (1 + 1e-9)])
    curve, = figure_curves(
        balanced=[(alpha, gamma, beta)], smooth_l1_betas=[], l1=False)
    from balanced_l1_plugin.analysis import balanced_l1_curve
    near = balanced_l1_curve(x, alpha, gamma, beta)

    np.testing.assert_allclose(near.grad, gamma, rtol=1e-6)
    np.testing.assert_allclose(near.loss, near.loss[1], rtol=1e-6)
    # On the plotted grid the steepest step of the loss is gamma * dx.
    assert np.max(np.diff(curve.loss) / np.diff(curve.x)) <= gamma + 1e-9


@pytest.mark.parametrize('beta', [1.0, 1.0 / 9, 0.5])
def test_smooth_l1_and_l1_curves(beta):
    x = regression_errors(3.0, 301, [beta, beta / 2])
    smooth = smooth_l1_curve(x, beta)
    l1 = l1_curve(x)

    at = {value: i for i, value in enumerate(x)}
    assert smooth.grad[at[beta]] == 1.0
    assert smooth.grad[at[beta / 2]] == pytest.approx(0.5)
    assert smooth.loss[at[beta]] == pytest.approx(0.5 * beta)
    assert smooth.loss[at[3.0]] == pytest.approx(3.0 - 0.5 * beta)
    assert smooth.grad[0] == 0.0
    np.testing.assert_allclose(l1.grad[1:], 1.0)
    np.testing.assert_allclose(l1.loss, x)


def test_figure_data_is_what_is_plotted():
    curves = figure_curves(
        balanced=[(0.5, 1.5, 1.0), (0.3, 1.5, 1.0)], smooth_l1_betas=[1.0])

    fig = plot_curves.plot_loss_curves(curves)

    ax_grad, ax_loss = fig.axes
    for curve in curves:
        x, grad = line_data(ax_grad, curve.label)
        _, loss = line_data(ax_loss, curve.label)
        np.testing.assert_array_equal(x, curve.x)
        np.testing.assert_array_equal(grad, curve.grad)
        np.testing.assert_array_equal(loss, curve.loss)
    x, grad = line_data(ax_grad, 'Balanced L1 (α=0.5, γ=1.5, β=1)')
    assert grad[0] == 0.0
    assert grad[x == 1.0][0] == pytest.approx(1.5)
    assert grad[-1] == pytest.approx(1.5)
    x, grad = line_data(ax_grad, 'Smooth L1 (β=1)')
    assert grad[x == 1.0][0] == 1.0
    x, loss = line_data(ax_loss, 'L1')
    assert loss[x == 2.0][0] == 2.0
    # The paper's point: at a small error Balanced L1 pushes harder.
    x, balanced = line_data(ax_grad, 'Balanced L1 (α=0.5, γ=1.5, β=1)')
    _, smooth = line_data(ax_grad, 'Smooth L1 (β=1)')
    small = (x > 0) & (x < 0.5)
    assert (balanced[small] > smooth[small]).all()


def test_curves_command_writes_png_and_svg(tmp_path):
    paths = plot_curves.main([
        'curves', '--balanced', '0.5,1.5,1.0', '--balanced', '0.3,1.5,1.0',
        '--smooth-l1-beta', '1.0', '--out-dir',
        str(tmp_path), '--svg'
    ])

    png = tmp_path / 'balanced_l1_curves.png'
    svg = tmp_path / 'balanced_l1_curves.svg'
    assert paths == [str(png), str(svg)]
    # 11 x 4.5 inches at 150 dpi.
    check_png(png, 675, 1650)
    text = svg.read_text()
    assert text.startswith('<?xml') and '<svg' in text


def test_curves_command_without_svg_writes_png_only(tmp_path):
    paths = plot_curves.main(['curves', '--no-l1', '--out-dir', str(tmp_path)])

    assert paths == [str(tmp_path / 'balanced_l1_curves.png')]
    assert sorted(p.name
                  for p in tmp_path.iterdir()) == ['balanced_l1_curves.png']


@pytest.mark.parametrize('value', ['0.5,1.5', '0.5,1.5,0', 'a,b,c', '1,2,3,4'])
def test_bad_balanced_argument(value, capsys):
    with pytest.raises(SystemExit):
        plot_curves.main(['curves', '--balanced', value])
    assert 'alpha,gamma,beta' in capsys.readouterr().err


@pytest.mark.parametrize('option', ['--smooth-l1-beta', '--x-max'])
@pytest.mark.parametrize('value', ['0', '-1', 'inf', 'x'])
def test_bad_positive_argument(option, value, capsys):
    with pytest.raises(SystemExit):
        plot_curves.main(['curves', option, value])
    assert 'expected a finite number > 0' in capsys.readouterr().err


def write_scalars(run_dir, records):
    vis = run_dir / 'vis_data'
    vis.mkdir(parents=True)
    with open(vis / 'scalars.json', 'w') as f:
        for record in records:
            f.write(json.dumps(record) + '\n')


def reg_grad(step, ratio, share, inlier=0.01, outlier=0.03):
    return {
        'loss': 1.0,
        'reg_grad/inlier_ratio': ratio,
        'reg_grad/inlier_grad_mean': inlier,
        'reg_grad/outlier_grad_mean': outlier,
        'reg_grad/inlier_grad_share': share,
        'iter': step,
        'step': step
    }


def test_read_shares_drops_repeats_and_takes_latest_run(tmp_path):
    write_scalars(tmp_path / '20260101_000000',
                  [reg_grad(50, 0.9, 0.9),
                   reg_grad(100, 0.9, 0.9)])
    write_scalars(
        tmp_path / '20260102_000000',
        [
            {
                'loss': 2.0,
                'step': 10
            },  # before the first recording
            reg_grad(50, 0.4, 0.2),
            reg_grad(100, 0.4, 0.2),  # logged again, not recorded again
            reg_grad(150, 0.5, 0.3),
            {
                'coco/bbox_mAP': 0.1,
                'step': 1
            },
        ])

    latest = plot_curves.read_shares(
        plot_curves.find_scalar_files(str(tmp_path)))
    steps, ratios = latest['reg_grad/inlier_ratio']
    assert steps.tolist() == [50, 150]
    assert ratios.tolist() == [0.4, 0.5]

    files = plot_curves.find_scalar_files(str(tmp_path), all_runs=True)
    assert len(files) == 2
    steps, shares = plot_curves.read_shares(
        files)['reg_grad/inlier_grad_share']
    # The later run overrides the earlier one at the same step.
    assert steps.tolist() == [50, 150]
    assert shares.tolist() == [0.2, 0.3]


def test_shares_command_plots_every_work_dir(tmp_path):
    for name, share in (('smooth_l1', 0.2), ('balanced_l1', 0.6)):
        write_scalars(
            tmp_path / name / '20260101_000000',
            [reg_grad(50 * i, 0.5, share + 0.01 * i) for i in range(1, 5)])
    out = tmp_path / 'plots'

    paths = plot_curves.main([
        'shares',
        str(tmp_path / 'smooth_l1'),
        str(tmp_path / 'balanced_l1'), '--out-dir',
        str(out)
    ])

    assert paths == [str(out / 'reg_grad_shares.png')]
    check_png(out / 'reg_grad_shares.png', 1050, 1650)
    runs = {
        name:
        plot_curves.read_shares(
            plot_curves.find_scalar_files(str(tmp_path / name)))
        for name in ('smooth_l1', 'balanced_l1')
    }
    fig = plot_curves.plot_shares(runs)
    share_ax = fig.axes[1]
    x, y = line_data(share_ax, 'balanced_l1')
    assert x.tolist() == [50, 100, 150, 200]
    np.testing.assert_allclose(y, [0.61, 0.62, 0.63, 0.64])


def test_shares_command_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='scalars.json'):
        plot_curves.main(['shares', str(tmp_path)])
    write_scalars(tmp_path / '20260101_000000', [{'loss': 1.0, 'step': 5}])
    with pytest.raises(SystemExit, match='RegressionGradientHook'):
        plot_curves.main(['shares', str(tmp_path)])
