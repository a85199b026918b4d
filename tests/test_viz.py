"""``viz.strip_cdn_links``: an animation's HTML player without its links to other hosts, whole tags only."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib import animation  # noqa: E402

from detptq_mini.viz import strip_cdn_links  # noqa: E402

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


# ----------------------------------------------------------------------------- viz.table

from detptq_mini.viz import Table, plot_selection_loop, table  # noqa: E402


def test_table_is_an_html_table_with_formatted_escaped_cells():
    t = table([[0.12345, None, "a<b"], [2, 3.5, "x"]], ["mAP", "p", "note"], index=["min-max", "Lp & p"],
              index_name="method", title="W4A4")
    assert isinstance(t, Table)
    out = t._repr_html_()
    assert out.startswith('<table class="detptq-table"><caption>W4A4</caption>')
    assert out.count("<tr>") == 3 and out.count("<th>") == 4 + 2  # header row + one label cell per row
    assert "<td style=\"text-align: right\">0.123</td>" in out and "<td>a&lt;b</td>" in out
    assert "<th>Lp &amp; p</th>" in out and "\u2014" in out  # escaped label, None as an em dash
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
