"""benchmarks/peers/run.py end to end on a tiny tree, with the systems that need no extra package
(packfmt, loose files, tar + index) and one deliberately broken adapter: the harness must report the
broken one as returning wrong bytes, and time it not at all; the others must pass every check."""

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(REPO, "benchmarks", "peers")

BROKEN = textwrap.dedent('''
    from tar_adapter import TarAdapter, TarReader

    class BrokenReader(TarReader):
        def get(self, i):
            b = super().get(i)
            return b if i % 7 else bytes([b[0] ^ 1]) + b[1:]   # flips one bit of every 7th sample

    class BrokenAdapter(TarAdapter):
        name = "broken tar"

        def open(self, out, rels):
            return BrokenReader(out)

    ADAPTER = BrokenAdapter()
''')


def test_peers_run_checks_bytes_and_reports(tmp_path):
    (tmp_path / "broken_adapter.py").write_text(BROKEN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), PEERS, os.environ.get("PYTHONPATH", "")]),
               PEERS_EXTRA_SYSTEMS="broken=broken_adapter")
    doc = tmp_path / "bench.md"
    doc.write_text("# benchmarks\n\n## Other\n\nsomeone else's section\n")
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(PEERS, "run.py"), "--systems", "packfmt,loose,tar,broken",
           "--files", "200", "--random", "300", "--verify", "40", "--reps", "1", "--loader-reps", "1",
           "--compressions", "none", "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
           "--docs", str(doc), "--img", "", "--json", str(out), "--timeout", "240"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for s in ("packfmt", "loose", "tar"):
        assert rows[s]["status"] == "ok", rows[s]
        assert rows[s]["random"] > 0 and rows[s]["sequential"] > 0 and rows[s]["loader"] > 0
    assert rows["packfmt"]["batched"] > 0 and rows["packfmt"]["loader_exact"] is True
    assert rows["broken"]["status"].startswith("WRONG BYTES"), rows["broken"]
    assert "random" not in rows["broken"] and "loader" not in rows["broken"]
    text = doc.read_text()
    assert "someone else's section" in text and "## Peers" in text and "<!-- peers:end -->" in text
    assert "WRONG BYTES" in text

    # Hand-written notes after the generated block survive a re-made report.
    doc.write_text(text + "\nhand-written analysis\n")
    r = subprocess.run(cmd[:2] + ["--from-json", str(out), "--cache", str(tmp_path / "cache"), "--work",
                                  str(tmp_path / "work"), "--docs", str(doc), "--img", ""],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    again = doc.read_text()
    assert again.count("## Peers") == 1 and "hand-written analysis" in again and "someone else's section" in again
