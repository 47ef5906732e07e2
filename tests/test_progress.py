"""Console lines of long phases (dask_lithops.progress); clusters' output is tested in
tests/test_package_sync.py."""

from __future__ import annotations

import io
import re

import dask
import pytest

from dask_lithops.progress import Progress, for_cluster


def test_one_line_per_phase_with_duration_and_detail():
    out = io.StringIO()
    p = Progress(stream=out)
    with p.phase("uploading 3 wheels", total=3000, unit="B") as ph:
        ph.advance(1000)
        assert p.lines() == ["uploading 3 wheels ... 1.0 kB/3.0 kB"]
        ph.advance(2000)
        ph.detail = "3.0 kB sent"
    with pytest.raises(RuntimeError), p.phase("installing"):
        raise RuntimeError("boom")
    lines = out.getvalue().splitlines()
    assert lines[0] == "dask-lithops: uploading 3 wheels ..."
    assert re.fullmatch(r"dask-lithops: uploading 3 wheels: done in \d+\.\d s \(3\.0 kB sent\)",
                        lines[1])
    assert re.fullmatch(r"dask-lithops: installing: failed after \d+\.\d s", lines[3])
    html = p._repr_html_()
    assert "uploading 3 wheels: done in" in html and "installing: failed after" in html


def test_quiet_by_option_config_or_silence_logs():
    assert for_cluster().quiet is False
    assert for_cluster(quiet=True).quiet is True
    assert for_cluster(silence_logs="error").quiet is True
    assert for_cluster(silence_logs="warning").quiet is False
    with dask.config.set({"lithops.cluster.quiet": True}):
        assert for_cluster().quiet is True
    out = io.StringIO()
    p = Progress(quiet=True, stream=out)
    with p.phase("building"):
        pass
    assert out.getvalue() == "" and p.lines()[0].startswith("building: done in")
