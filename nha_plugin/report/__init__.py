"""``nha report``: a static site of a benchmark run and of a model's units, opened from ``file://``.

Rooms: :mod:`.leaderboard` (cells with bootstrap intervals and paired tests, per-image drill-down),
:mod:`.atlas` (every head, neuron and pair of a CLIP-ResNet: words, importance, top images), :mod:`.site`
(pages and lazily loaded data shards), :mod:`.assets` (the page's script and style), :mod:`.pictures` (PNGs),
:mod:`.build` (:func:`build_report`: all of it, resumably). The guide is docs/guides/report.md.
"""
from .build import ReportConfig, build_report
from .leaderboard import drilldown, leaderboard, read_run
from .site import site_size, write_site

__all__ = ["ReportConfig", "build_report", "read_run", "leaderboard", "drilldown", "write_site", "site_size"]
