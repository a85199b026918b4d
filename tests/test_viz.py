"""``viz``: the unit diagram, the table helper, legible figures, and ``strip_cdn_links`` (an animation's HTML
player without its links to other hosts, whole tags only)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib import animation  # noqa: E402

import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from detptq_mini.data import ShapesDataset  # noqa: E402
from detptq_mini.quant import QuantConfig  # noqa: E402
from detptq_mini.viz import (  # noqa: E402
    MIN_TEXT_PX, Table, plot_detections, plot_ratio_vs_bits, plot_ratio_vs_p, plot_samples, plot_units,
    smallest_text_px,
    strip_cdn_links, unit_edges,
)

CDN = "https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/css/font-awesome.min.css"


def test_a_link_over_two_lines_goes_whole():
    """The tag as matplotlib writes it: ``<link rel="stylesheet"`` on one line, ``href=...>`` on the next."""
    html = f'\n<link rel="stylesheet"\nhref="{CDN}">\n<script language="javascript">\n  var a = 1;\n</script>\n'
    out = strip_cdn_links(html)
    assert out == '\n<script language="javascript">\n  var a = 1;\n</script>\n'
    assert "href" not in out and "maxcdn" not in out


@pytest.mark.parametrize("tag", [
    f'<link rel="stylesheet" href="{CDN}">',
    f"<LINK\n   rel='stylesheet'\n   href='{CDN}'\n   crossorigin='anonymous' />",
    '<link href="//cdn.example.org/icons.css" rel="stylesheet">',
    '<link rel="stylesheet" href=http://cdn.example.org/icons.css>',
])
def test_every_wrapping_of_a_remote_link_goes(tag):
    assert strip_cdn_links(f"<div>a</div>\n{tag}\n<div>b</div>") == "<div>a</div>\n<div>b</div>"


def test_everything_else_is_kept_byte_for_byte():
    html = ('<link rel="stylesheet" href="_static/local.css">\n<a href="https://example.org">a link</a>\n'
            '<style>\n.anim { display: inline-block; }\n</style>\r\n<img src="data:image/png;base64,AAAA">')
    assert strip_cdn_links(html) == html


def test_matplotlib_player_keeps_no_remote_link():
    """On the real ``to_jshtml`` output: nothing from another host is left, and only the tag is removed."""
    fig, ax = plt.subplots(figsize=(1, 1))
    (line,) = ax.plot([], [])
    anim = animation.FuncAnimation(fig, lambda k: (line,), frames=2)
    html = anim.to_jshtml(fps=2, default_mode="once")
    plt.close(fig)
    out = strip_cdn_links(html)
    assert "<link" not in out and "maxcdn" not in out and "font-awesome.min.css" not in out
    assert "<script" in out and "<input" in out  # the player itself is all there
    assert len(html) - len(out) < 200  # the tag and its line break, nothing more


# ----------------------------------------------------------------------------- the unit diagram


def _drawn(fig, cls, prefix):
    return [a.get_gid().removeprefix(prefix) for a in fig.axes[0].patches
            if isinstance(a, cls) and (a.get_gid() or "").startswith(prefix)]


def test_unit_edges_are_the_tensors_each_unit_reads(pretrained):
    edges = unit_edges(pretrained)
    assert len(edges) == sum(len(u.inputs) for u in pretrained.units) == 26
    assert edges[0] == ("image", "backbone.stem")
    assert ("backbone.c2f3", "neck.td4") in edges and ("backbone.sppf", "neck.bu5") in edges  # skips
    assert [d for s, d in edges if s == "neck.td3"] == ["neck.down3", "head.p3.cls", "head.p3.box"]


def test_plot_units_draws_one_box_per_unit_and_one_arrow_per_edge(pretrained):
    fig = plot_units(pretrained)
    assert _drawn(fig, FancyBboxPatch, "unit:") == list(pretrained.unit_names)
    assert _drawn(fig, FancyArrowPatch, "edge:") == [f"{s}->{d}" for s, d in unit_edges(pretrained)]
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "stem\nW8A8" in texts  # protocol "ours": the stem at 8 bits
    assert "p3.cls\nW4A4 x2, W8A8" in texts  # two W4A4 convs, then the 8-bit prediction conv
    assert "c2f2\nW4A4 x6" in texts
    assert smallest_text_px(fig) >= MIN_TEXT_PX
    plt.close(fig)


def test_plot_units_marks_the_head_fp_under_head_fp(pretrained):
    fig = plot_units(pretrained, QuantConfig(w_bits=4, a_bits=8, protocol="head-fp"))
    texts = {t.get_text() for t in fig.axes[0].texts}
    for unit in pretrained.head_units():
        assert f"{unit.split('.', 1)[1]}\nFP x3" in texts
    assert "down1\nW4A8" in texts
    plt.close(fig)


def test_plot_units_needs_a_unit_detector():
    with pytest.raises(ValueError, match="model must be a UnitDetector"):
        plot_units(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


# ----------------------------------------------------------------------------- legible figures


def test_the_library_figures_are_legible_at_the_book_width(pretrained):
    """At most three panels a row, and every text at least MIN_TEXT_PX px high in the book's column."""
    val = ShapesDataset("val", 6, seed=0)
    images = val.images(0, 6)
    dets = pretrained.detect(images)
    summary = {"bits": ["W8A8", "W4A4"], "rows": [
        {"label": lab, "cells": {b: {"ratio_to_fp_mean": r, "map_mean": r, "map_std": None, "n": 1}
                                 for b, r in (("W8A8", 0.99), ("W4A4", 0.5 + k / 10))}}
        for k, lab in enumerate(["min-max", "Lp p=2"])]}
    figs = [plot_samples(val), plot_detections(images, dets, val.class_names, targets=[val[i][1] for i in range(6)]),
            plot_ratio_vs_bits(summary), plot_ratio_vs_p({"a": summary, "b": _p_summary()}, "W4A4")]
    for fig in figs:
        assert smallest_text_px(fig) >= MIN_TEXT_PX
        plt.close(fig)
    with pytest.raises(ValueError, match=r"cols=4 must be an integer in 1\.\.3"):
        plot_samples(val, cols=4)


def test_smallest_text_px_shrinks_a_wide_figure():
    """A 10-inch figure at 100 dpi is shrunk to the 684 px column: 10 pt text displays at about 9.5 px."""
    fig, ax = plt.subplots(figsize=(10, 2), dpi=100)
    ax.set_title("t", fontsize=20)
    ax.set_xlabel("x", fontsize=10)
    px = smallest_text_px(fig)
    width = fig.get_tightbbox(fig.canvas.get_renderer()).width * 100
    assert px == pytest.approx(10 * 100 / 72 * 684 / width)
    fig.set_size_inches(4, 2)
    assert smallest_text_px(fig) == pytest.approx(10 * 100 / 72)  # narrower than the column: not shrunk
    plt.close(fig)


# ----------------------------------------------------------------------------- tables


def test_table_html_and_text():
    t = Table([{"bits": "W8A8", "mAP": 0.8861, "n": 3}, {"bits": "W4A4 <b>", "mAP": 0.126}],
              formats={"mAP": ".3f"}, caption="min-max")
    html = t._repr_html_()
    assert html.startswith('<table class="table"><caption>min-max</caption>')
    assert "<th>bits</th>" in html and '<th style="text-align: right">mAP</th>' in html
    assert '<td style="text-align: right">0.886</td>' in html and "W4A4 &lt;b&gt;" in html
    assert "<td></td>" in html  # the missing n
    assert repr(t).splitlines() == ["min-max", "bits        mAP  n", "W8A8      0.886  3", "W4A4 <b>  0.126"]


def test_table_rows_as_sequences_and_bad_input():
    t = Table([("a", 1), ("b", 22)], columns=["k", "v"], formats={"v": lambda v: f"{v:,d} px"})
    assert repr(t).splitlines() == ["k      v", "a   1 px", "b  22 px"]  # numbers right-aligned
    with pytest.raises(ValueError, match="columns is needed"):
        Table([("a", 1)])
    with pytest.raises(ValueError, match=r"rows\[0\] has 2 values for 3 columns"):
        Table([("a", 1)], columns=["x", "y", "z"])
    with pytest.raises(ValueError, match=r"formats has \['w'\] that are not columns"):
        Table([{"v": 1}], formats={"w": ".1f"})
    with pytest.raises(ValueError, match="at least one column"):
        Table([])


def test_plot_unit_losses_draws_one_styled_line_per_profile():
    from detptq_mini.viz import plot_unit_losses

    profiles = {"joint": {"stem": 1e-3, "down1": 0.5, "c2f1": 1.0},
                "QDrop": {"stem": 2e-3, "down1": 0.9, "c2f1": 3.0}}
    fig = plot_unit_losses(profiles, title="t")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["joint", "QDrop"]
    assert list(lines[1].get_ydata()) == [2e-3, 0.9, 3.0]
    assert lines[0].get_linestyle() != lines[1].get_linestyle() and lines[0].get_color() != lines[1].get_color()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stem", "down1", "c2f1"] and ax.get_yscale() == "log"
    assert smallest_text_px(fig) >= MIN_TEXT_PX
    plt.close(fig)
    fig = plot_unit_losses({"a": {"stem": 1.0, "head": 2.0}, "b": {"stem": 1.0}})  # b has a gap at "head"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["stem", "head"]
    assert str(fig.axes[0].get_lines()[1].get_ydata()[1]) == "nan"
    plt.close(fig)
    with pytest.raises(ValueError, match="another order"):
        plot_unit_losses({"a": {"stem": 1.0, "head": 2.0}, "b": {"head": 1.0, "stem": 1.0}})
    with pytest.raises(ValueError, match="profiles is empty"):
        plot_unit_losses({})


def test_reconstruction_flow_names_the_three_cached_tensors_and_the_coin():
    from detptq_mini.viz import plot_reconstruction_flow

    fig = plot_reconstruction_flow()
    texts = [t.get_text() for t in fig.axes[0].texts]
    for needle in ("$x_{fp}$", "$x_q$", "$y_{fp}$", "coin per element", "gradients to $V$ and $s$"):
        assert any(needle in t for t in texts), needle
    assert len([p for p in fig.axes[0].patches if p.get_linestyle() == "--"]) == 3  # the cached tensors
    assert smallest_text_px(fig) >= MIN_TEXT_PX
    plt.close(fig)


# ----------------------------------------------------------------------------- viz.table

from detptq_mini.viz import plot_selection_loop, table  # noqa: E402


def test_table_is_an_html_table_with_formatted_escaped_cells():
    t = table([[0.12345, None, "a<b"], [2, 3.5, "x"]], ["mAP", "p", "note"], index=["min-max", "Lp & p"],
              index_name="method", title="W4A4")
    assert isinstance(t, Table) and t.columns == ["method", "mAP", "p", "note"]  # the labels are the first column
    out = t._repr_html_()
    assert out.startswith('<table class="table"><caption>W4A4</caption>')
    assert out.count("<tr>") == 3 and out.count("<th>") + out.count("<th ") == 4  # one header row, 4 columns
    assert '<td style="text-align: right">0.123</td>' in out and "<td>a&lt;b</td>" in out
    assert '<td style="text-align: right">2</td>' in out  # an integer as it is, right-aligned with its column
    assert "<td>Lp &amp; p</td>" in out and '<td style="text-align: right">\u2014</td>' in out  # None: em dash
    assert "a<b" not in out


def test_table_text_is_aligned():
    t = table([[1.0, "ab", 3], [10.25, "c", 12]], ["x", "name", "n"], fmt=".1f")
    assert repr(t).splitlines() == ["   x  name   n", " 1.0  ab     3", "10.2  c     12"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=[[1]], columns=[]), "columns is empty"),
    (dict(rows=[[1, 2]], columns=["a"]), r"rows\[0\] has 2 values but columns has 1"),
    (dict(rows=[[1]], columns=["a"], index=["r", "s"]), "index has 2 labels but there are 1 rows"),
    (dict(rows=[[1]], columns=["a"], fmt="q"), "fmt='q' is not a format spec"),
])
def test_table_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        table(**kwargs)


# ----------------------------------------------------------------------------- viz.plot_selection_loop


def test_selection_loop_diagram_has_every_step_readable_and_apart():
    fig = plot_selection_loop()
    try:
        ax = fig.axes[0]
        boxes = {t.get_gid(): t for t in ax.texts if t.get_bbox_patch() is not None}
        assert set(boxes) == {"calib", "fp", "target", "layer", "p", "set", "run", "odol", "keep"}
        assert "ODOL" in boxes["odol"].get_text() and "forward order" in boxes["layer"].get_text()
        arrows = {a.get_gid() for a in ax.texts if a.get_gid() and "->" in a.get_gid()
                  and not a.get_gid().startswith("label:")}
        assert {"odol->p", "keep->layer", "target->odol", "run->odol"} <= arrows and len(arrows) == 10
        # every text shows at >= 9 px when the figure is shown 684 px wide (the book's column)
        width_in = fig.get_size_inches()[0]
        assert all(t.get_fontsize() * 684 / (width_in * 72) >= 9 for t in ax.texts if t.get_text())
        # no two step boxes overlap, and every box is inside the figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ext = {k: t.get_bbox_patch().get_window_extent(renderer) for k, t in boxes.items()}
        keys = sorted(ext)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                assert not ext[a].overlaps(ext[b]), (a, b)
        fb = fig.bbox
        assert all(fb.x0 <= e.x0 and e.x1 <= fb.x1 and fb.y0 <= e.y0 and e.y1 <= fb.y1 for e in ext.values())
    finally:
        plt.close(fig)


@pytest.mark.parametrize("bad", [5, float("nan"), "10", True])
def test_selection_loop_bad_fontsize(bad):
    with pytest.raises(ValueError, match="fontsize="):
        plot_selection_loop(bad)


# ----------------------------------------------------------------------------- benchmark tables and lines

def _summary():
    return {"bits": ["W8A8", "W4A4"], "rows": [
        {"label": "min-max", "cells": {"W8A8": {"ratio_to_fp_mean": 0.999, "map_mean": 0.8861, "map_std": 0.0012,
                                                "n": 3},
                                       "W4A4": {"ratio_to_fp_mean": 0.118, "map_mean": 0.1049, "map_std": None,
                                                "n": 1}}},
        {"label": "joint", "cells": {"W4A4": {"ratio_to_fp_mean": 0.923, "map_mean": 0.8189, "map_std": 0.0041,
                                              "n": 3}}}]}


def test_summary_table_shows_mean_std_and_seeds_and_a_dash_where_no_cell():
    from detptq_mini.viz import summary_table

    t = summary_table(_summary(), ["joint", "min-max"], caption="mAP50:95")
    assert t.columns == ["method", "W8A8", "W4A4"] and t.caption == "mAP50:95"
    assert [[text for text, _ in row] for row in t.rows] == [["joint", "—", "0.819 ± 0.004 (3)"],
                                                             ["min-max", "0.886 ± 0.001 (3)", "0.105 (1)"]]
    pct = summary_table(_summary(), ["min-max"], bits=["W4A4"], pct=True)
    assert [[text for text, _ in row] for row in pct.rows] == [["min-max", "11.8 % (1)"]]
    assert "<td>0.819 ± 0.004 (3)</td>" in t._repr_html_()
    with pytest.raises(ValueError, match=r"labels: \['BRECQ'\] are not rows of the summary"):
        summary_table(_summary(), ["BRECQ"])
    with pytest.raises(ValueError, match=r"bits: \['W3A3'\] are not columns of the summary"):
        summary_table(_summary(), ["joint"], bits=["W3A3"])


def test_row_of_and_cell_of_name_what_there_is():
    from detptq_mini.benchmark import cell_of, row_of

    s = _summary()
    assert row_of(s, "joint")["label"] == "joint" and cell_of(s, "joint", "W4A4")["n"] == 3
    assert cell_of(s, "joint", "W8A8") is None
    with pytest.raises(ValueError, match=r"label='QDrop' is not a row of the summary; allowed: \['min-max', 'joint'\]"):
        cell_of(s, "QDrop", "W4A4")


def test_plot_ratio_vs_bits_tells_series_apart_by_line_style_and_marker_too():
    labels = [f"m{i}" for i in range(5)]
    summary = {"bits": ["W8A8", "W4A4"], "rows": [
        {"label": lab, "cells": {b: {"ratio_to_fp_mean": 0.5, "map_mean": 0.5, "map_std": None, "n": 1}
                                 for b in ("W8A8", "W4A4")}} for lab in labels]}
    fig = plot_ratio_vs_bits(summary)
    lines = [c.lines[0] for c in fig.axes[0].containers if c.get_label() in labels]  # each series' data line
    styles = [(ln.get_linestyle(), ln.get_marker()) for ln in lines]
    assert len(lines) == 5 and len(set(styles)) == 5 and len({s for s, _ in styles}) == 4
    plt.close(fig)


def _p_summary(bits=("W4A4",), n=1):
    """A summary with Lp p=1, 2, 3 rows (p = 2 best) and a DetPTQ row; one seed unless n > 1."""
    def cell(r):
        return {"ratio_to_fp_mean": r, "map_mean": r * 0.8, "map_std": 0.01 if n > 1 else None, "n": n}
    rows = [{"label": f"Lp p={p:g}", "cells": {b: cell(r) for b in bits}} for p, r in ((3, 0.6), (1, 0.2), (2, 0.7))]
    rows.append({"label": "DetPTQ simple", "cells": {b: cell(0.75) for b in bits}})
    rows.append({"label": "min-max", "cells": {b: cell(0.1) for b in bits}})
    return {"bits": list(bits), "rows": rows}


def test_plot_ratio_vs_p_draws_each_models_p_curve_its_best_p_and_its_reference():
    fig = plot_ratio_vs_p({"big": _p_summary(), "small": _p_summary(("W8A8", "W4A4"), n=3)}, "W4A4", title="t")
    ax = fig.axes[0]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["big: DetPTQ simple (1 seed)", "small: DetPTQ simple (3 seeds)",
                      "big: Lp, fixed p (1 seed)", "small: Lp, fixed p (3 seeds)"] and ax.get_title() == "t"
    curve = dict(zip(labels, handles))["big: Lp, fixed p (1 seed)"][0]
    assert list(curve.get_xdata()) == [1, 2, 3] and list(curve.get_ydata()) == pytest.approx([20, 70, 60])
    circles = [ln for ln in ax.lines if ln.get_marker() == "o" and ln.get_markerfacecolor() == "none"]
    assert [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in circles] == [(2, pytest.approx(70))] * 2  # best p
    refs = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert [ln.get_ydata()[0] for ln in refs] == pytest.approx([75, 75])
    # the error bar of a 3-seed point: the mAP std as % of FP (0.01 / 0.56 * 70)
    small = dict(zip(labels, handles))["small: Lp, fixed p (3 seeds)"]
    seg = small[2][0].get_segments()[1]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * 100 * 0.7 * 0.01 / 0.56)
    plt.close(fig)
    no_ref = plot_ratio_vs_p({"big": _p_summary()}, "W4A4", reference=None)
    assert not [ln for ln in no_ref.axes[0].lines if ln.get_linestyle() == "--"]
    plt.close(no_ref)


def test_plot_ratio_vs_p_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"bits='W3A3' has no cells in 'big'; allowed: \['W4A4'\]"):
        plot_ratio_vs_p({"big": _p_summary()}, "W3A3")
    empty = {"bits": ["W4A4"], "rows": [{"label": "min-max", "cells": {"W4A4": {}}}]}
    with pytest.raises(ValueError, match=r"summaries\['e'\] has no 'Lp p=...' row with a cell at W4A4"):
        plot_ratio_vs_p({"e": empty}, "W4A4")
    with pytest.raises(ValueError, match="summaries: give at least one"):
        plot_ratio_vs_p({}, "W4A4")


# ----------------------------------------------------------------------------- cells_table, comparison_table
def test_cells_table_writes_percent_with_its_spread_and_a_dash_for_a_cell_not_done():
    from detptq_mini.viz import cell_text, cells_table

    s = _summary()
    joint = s["rows"][1]["cells"]["W4A4"]
    one_seed = s["rows"][0]["cells"]["W4A4"]
    # the % spread is the mAP's std over the FP mAP: 0.923 * 0.0041 / 0.8189 = 0.46 points
    assert cell_text(joint, pct=True, std=True) == "92.3 ± 0.5 % (3)"
    assert cell_text(joint, pct=True) == "92.3 % (3)"  # as summary_table(pct=True) writes it
    assert cell_text(joint) == "0.819 ± 0.004 (3)" and cell_text(one_seed, pct=True) == "11.8 % (1)"
    t = cells_table({"joint": {"ours": joint, "head FP": None}, "min-max": {"ours": one_seed}}, caption="W4A4")
    assert t.columns == ["method", "ours", "head FP"] and t.caption == "W4A4"
    assert [[text for text, _ in row] for row in t.rows] == [["joint", "92.3 ± 0.5 % (3)", "—"],
                                                             ["min-max", "11.8 % (1)", "—"]]
    # numeric column keys (a keep probability) are shown by their text, and filled
    t = cells_table({"QDrop": {0.5: one_seed, 1.0: joint}}, std=False)
    assert t.columns == ["method", "0.5", "1.0"]
    assert [text for text, _ in t.rows[0]] == ["QDrop", "11.8 % (1)", "92.3 % (3)"]
    with pytest.raises(ValueError, match="first='ours' is also a column of rows"):
        cells_table({"joint": {"ours": joint}}, first="ours")
    with pytest.raises(ValueError, match="cell must be a cell of summarize"):
        cell_text(0.92)
    with pytest.raises(ValueError, match="rows is empty"):
        cells_table({})
    with pytest.raises(ValueError, match=r"rows\['joint'\] must map a column name to a cell"):
        cells_table({"joint": joint["n"]})


def test_comparison_table_gives_the_gap_the_bar_and_the_verdict_of_compare():
    from detptq_mini.benchmark import compare
    from detptq_mini.viz import comparison_table

    a = {"n": 3, "map_mean": 0.82, "map_std": 0.004}
    b = {"n": 3, "map_mean": 0.56, "map_std": 0.005}
    c = {"n": 3, "map_mean": 0.815, "map_std": 0.004}
    t = comparison_table([("joint", "QDrop", compare(a, b)), ("joint", "twin", compare(a, c)),
                          ("QDrop", "joint", compare(b, a))])
    cells = [[text for text, _ in row] for row in t.rows]
    assert t.columns == ["A", "B", "A - B", "bar", "seeds", "verdict"]
    pooled = ((0.004 ** 2 + 0.005 ** 2) / 2) ** 0.5
    assert cells[0] == ["joint", "QDrop", "+0.2600", f"{2 * pooled:.4f}", "3/3", "A ahead"]
    assert cells[1][2:] == ["+0.0050", "0.0080", "3/3", "within noise"]
    assert cells[2][-1] == "B ahead" and cells[2][2] == "-0.2600"
    one = {"n": 1, "map_mean": 0.5, "map_std": None}
    assert [text for text, _ in comparison_table([("a", "b", compare(one, one))]).rows[0]][3:] == \
        ["", "1/1", "one seed: no verdict"]
    with pytest.raises(ValueError, match="rows is empty"):
        comparison_table([])
    with pytest.raises(ValueError, match=r"rows\[0\] must be \(name A, name B, compare\(a, b\)\)"):
        comparison_table([("a", "b", 0.3)])
    with pytest.raises(ValueError, match=r"rows\[0\] must be"):
        comparison_table([compare(a, b)])


def test_plot_ratio_vs_setting_draws_a_line_per_series_with_legible_text():
    from detptq_mini.viz import MIN_TEXT_PX, plot_ratio_vs_setting, smallest_text_px

    def cell(r, n=3):
        return {"ratio_to_fp_mean": r, "map_mean": 0.89 * r, "map_std": 0.004 if n > 1 else None, "n": n}

    fig = plot_ratio_vs_setting({"QDrop": {0.5: cell(0.64), 0.75: cell(0.83), 0.9: cell(0.91), 1.0: cell(0.92)},
                                 "DetPTQ+QDrop": {0.5: cell(0.63), 1.0: cell(0.89, n=1)}},
                                xlabel="keep probability", reference=("joint, head FP", cell(0.96)))
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() != "None"]
    ys = sorted(round(y, 1) for ln in lines for y in ln.get_ydata())
    assert 64.0 in ys and 92.0 in ys and 89.0 in ys and 96.0 in ys  # both series and the reference line
    # told apart by line style too (a custom dash pattern reports as "--": compare the patterns themselves)
    assert len({(ln.get_linestyle(), str(ln._dash_pattern)) for ln in lines}) == len(lines)
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == sorted(["joint, head FP (3 seeds)", "QDrop (3 seeds)", "DetPTQ+QDrop (1-3 seeds)"])
    qdrop = next(ln for ln in lines if list(ln.get_xdata()) == [0.5, 0.75, 0.9, 1.0])
    assert [round(y, 1) for y in qdrop.get_ydata()] == [64.0, 83.0, 91.0, 92.0]  # sorted by the setting
    assert smallest_text_px(fig) >= MIN_TEXT_PX
    with pytest.raises(ValueError, match="series is empty"):
        plot_ratio_vs_setting({}, xlabel="x")
    with pytest.raises(ValueError, match=r"series\['QDrop'\] has no cell"):
        plot_ratio_vs_setting({"QDrop": {0.5: None}}, xlabel="x")
    with pytest.raises(ValueError, match=r"series\['QDrop'\] has settings that are not numbers: \['half'\]"):
        plot_ratio_vs_setting({"QDrop": {"half": cell(0.6)}}, xlabel="x")
    with pytest.raises(ValueError, match="reference must be"):
        plot_ratio_vs_setting({"QDrop": {0.5: cell(0.6)}}, xlabel="x", reference=("joint", None))
