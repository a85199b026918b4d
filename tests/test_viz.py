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
    plt.close(fig)
