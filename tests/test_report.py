"""The report: every file is written, stands alone, shows every number, and escapes what it is given."""

from __future__ import annotations

import base64
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tokenbridge.reporting.document import MISSING, format_value
from tokenbridge.reporting.plots import axis_limits, use_log_scale
from tokenbridge.stages.report import PRIMARY_MARK, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "step,loss,alm_loss,sft_loss,learning_rate,seconds"
METRICS = {
    "primary_metric": "gsm_exact_match",
    "models": {
        "teacher": {"gsm_exact_match": 0.2, "gsm_exact_match_flexible": 0.3, "gsm_n": 10,
                    "bits_per_byte": 0.91, "bpb_bytes": 12345},
        "student_before": {"gsm_exact_match": 0.0, "gsm_exact_match_flexible": 0.1, "gsm_n": 10,
                           "bits_per_byte": 1.3125, "bpb_bytes": 12345},
        # gsm_exact_match_flexible is missing on purpose
        "student_after": {"gsm_exact_match": 0.1, "gsm_n": 10, "bits_per_byte": 1.1172, "bpb_bytes": 12345},
    },
}
CONTEXT = {
    "teacher": "qwen2.5-coder-0.5b-instruct", "student": "smollm2-135m-instruct", "profile": "default",
    "git_commit": "abc123 <script>alert('x')</script>", "teacher_mode": "offline", "steps": 4, "machine": "2-core CPU",
    "registry": {"model": "tokenbridge-student", "version": 3, "candidate": True, "champion_moved": False,
                 "champion_version": 2, "reason": "0.10 <= champion 0.20 on gsm_exact_match"},
    "params": {"distill": {"steps": 4, "learning_rate": 5e-05, "alm": {"temperature": 1.0}}, "evaluate": {"limit": 10}},
}


class _Tables(HTMLParser):
    """Every <table> in an HTML page as rows of cell texts (entities decoded)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in a Markdown text as rows of cell texts, the alignment row left out."""
    tables, current = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if current is None:
            current = []
            tables.append(current)
        cells = [html.unescape(cell.strip().replace("\\|", "|")) for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if not all(re.fullmatch(r"-+:?", cell) for cell in cells):
            current.append(cells)
    return tables


def _table_starting(tables: list[list[list[str]]], first_header: str) -> list[list[str]]:
    [table] = [table for table in tables if table[0][0] == first_header]
    return table


def _history(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def history(tmp_path) -> Path:
    return _history(tmp_path / "history.csv", ["1,5.2,4.6,0.6,5e-05,1.5", "2,2.1,1.8,0.3,5e-05,1.25",
                                               "3,0.9,0.7,0.2,5e-05,1.0", "4,0.41,0.3,0.11,5e-05,1.0"])


@pytest.fixture
def report(tmp_path, history) -> dict[str, Path]:
    return render_report(METRICS, history, CONTEXT, tmp_path / "reports")


def test_every_output_file_exists_and_is_non_empty(report, tmp_path):
    out = tmp_path / "reports"
    assert report == {"markdown": out / "report.md", "html": out / "report.html",
                      "loss_curves": out / "plots" / "loss_curves.png",
                      "metrics_by_model": out / "plots" / "metrics_by_model.png"}
    for path in report.values():
        assert path.is_file() and path.stat().st_size > 0, path


def test_plots_are_valid_pngs(report):
    for name in ("loss_curves", "metrics_by_model"):
        assert report[name].read_bytes().startswith(PNG_MAGIC), name


def test_html_is_standalone_and_embeds_every_plot(report):
    text = report["html"].read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert sorted(base64.b64decode(data) for data in embedded) == sorted(
        report[name].read_bytes() for name in ("loss_curves", "metrics_by_model"))


def test_markdown_references_the_plots_by_relative_path(report):
    text = report["markdown"].read_text(encoding="utf-8")
    assert "](plots/loss_curves.png)" in text and "](plots/metrics_by_model.png)" in text


def test_every_model_and_metric_value_appears_in_both_metric_tables(report):
    metric_names = ["gsm_exact_match", "gsm_exact_match_flexible", "gsm_n", "bits_per_byte", "bpb_bytes"]
    expected = [["model", f"gsm_exact_match {PRIMARY_MARK}", *metric_names[1:]]] + [
        [name, *(format_value(scores.get(metric)) for metric in metric_names)]
        for name, scores in METRICS["models"].items()]
    markdown = _markdown_tables(report["markdown"].read_text(encoding="utf-8"))
    page = _Tables(report["html"].read_text(encoding="utf-8")).tables
    assert _table_starting(markdown, "model") == expected
    assert _table_starting(page, "model") == expected


def test_missing_metrics_render_as_a_dash(report):
    for tables in (_markdown_tables(report["markdown"].read_text(encoding="utf-8")),
                   _Tables(report["html"].read_text(encoding="utf-8")).tables):
        header, *rows = _table_starting(tables, "model")
        after = next(row for row in rows if row[0] == "student_after")
        assert after[header.index("gsm_exact_match_flexible")] == MISSING == "–"
        assert MISSING not in next(row for row in rows if row[0] == "teacher")


def test_the_primary_metric_column_is_marked(report):
    text = report["html"].read_text(encoding="utf-8")
    assert f'<th class="primary">gsm_exact_match {PRIMARY_MARK}</th>' in text
    assert text.count('<td class="primary">') == len(METRICS["models"])
    markdown = report["markdown"].read_text(encoding="utf-8")
    assert f"| gsm_exact_match {PRIMARY_MARK} |" in markdown and f"bits_per_byte {PRIMARY_MARK}" not in markdown


def test_the_summary_states_each_number_and_the_direction_of_change(report):
    summary = report["markdown"].read_text(encoding="utf-8").split("\n\n")[1]
    assert summary == (
        "The distilled student's gsm_exact_match is 0.1000 (higher is better, n = 10), up from 0.0000 before "
        "distillation (+0.1000, an improvement); the teacher's is 0.2000. "
        "The distilled student's bits_per_byte is 1.1172 (lower is better), down from 1.3125 before "
        "distillation (-0.1953, an improvement); the teacher's is 0.9100.")


def test_the_summary_calls_a_worse_student_a_regression(tmp_path, history):
    models = {"student_before": {"gsm_exact_match": 0.3, "bits_per_byte": 1.0},
              "student_after": {"gsm_exact_match": 0.3, "bits_per_byte": 1.25}}
    paths = render_report({"primary_metric": "gsm_exact_match", "models": models}, history, {}, tmp_path / "r")
    summary = paths["markdown"].read_text(encoding="utf-8").split("\n\n")[1]
    assert "the same as before distillation (0.3000)" in summary
    assert "up from 1.0000 before distillation (+0.2500, a regression)" in summary
    assert "improvement" not in summary and "teacher" not in summary


def test_intervals_show_beside_their_values_and_a_change_inside_them_is_called_noise(tmp_path, history):
    models = {"student_before": {"bits_per_byte": 1.00, "bits_per_byte_low": 0.95, "bits_per_byte_high": 1.06,
                                 "gsm_exact_match": 0.1, "gsm_exact_match_stderr": 0.1, "gsm_n": 10,
                                 "chunk_gap_bits_per_byte": 0.40, "chunk_gap_bits_per_byte_low": 0.38,
                                 "chunk_gap_bits_per_byte_high": 0.42},
              "student_after": {"bits_per_byte": 0.98, "bits_per_byte_low": 0.93, "bits_per_byte_high": 1.04,
                                "gsm_exact_match": 0.9, "gsm_exact_match_stderr": 0.05, "gsm_n": 10,
                                "chunk_gap_bits_per_byte": 0.30, "chunk_gap_bits_per_byte_low": 0.28,
                                "chunk_gap_bits_per_byte_high": 0.32}}
    paths = render_report({"primary_metric": "gsm_exact_match", "models": models}, history, {}, tmp_path / "r")
    text = paths["markdown"].read_text(encoding="utf-8")
    summary = text.split("\n\n")[1]
    assert ("bits_per_byte is 0.9800 (lower is better, 95 % interval 0.9300 to 1.0400), down from 1.0000 before "
            "distillation (-0.0200, inside each other's 95 % intervals: not a measurable difference)") in summary
    assert "up from 0.1000 before distillation (+0.8000, an improvement)" in summary
    assert ("chunk_gap_bits_per_byte is 0.3000 (lower is better, 95 % interval 0.2800 to 0.3200), down from 0.4000 "
            "before distillation (-0.1000, an improvement)") in summary, "how close the student got to its teacher"
    assert "| 0.9800 [0.9300, 1.0400] |" in text and "| 0.9000 [0.8020, 0.9980] |" in text
    assert "bits_per_byte_low" not in text and "_stderr" not in text, "intervals are not metric columns"


def test_a_panel_of_near_numbers_does_not_start_at_zero_and_fractions_share_one_axis():
    low, high = axis_limits("bits_per_byte", [0.5712, 0.5707, 0.55, 0.59])
    assert 0.5 < low < 0.55 and 0.59 < high < 0.61
    assert axis_limits("gsm_exact_match", [0.0, 0.1, 0.3]) == (0.0, 1.1)


def test_a_one_row_history_still_renders(tmp_path):
    history = _history(tmp_path / "one.csv", ["1,2.5,2.5,,1e-05,3.2"])
    paths = render_report(METRICS, history, CONTEXT, tmp_path / "r")
    assert paths["loss_curves"].read_bytes().startswith(PNG_MAGIC)
    training = _table_starting(_markdown_tables(paths["markdown"].read_text(encoding="utf-8")), "series")
    assert training == [["series", "first", "last", "min"], ["loss (total)", "2.5000", "2.5000", "2.5000"],
                        ["alm_loss", "2.5000", "2.5000", "2.5000"]]


def test_a_history_without_steps_still_renders(tmp_path):
    paths = render_report(METRICS, _history(tmp_path / "empty.csv", []), {}, tmp_path / "r")
    assert paths["loss_curves"].read_bytes().startswith(PNG_MAGIC)
    assert "The distill history lists no steps." in paths["markdown"].read_text(encoding="utf-8")


def test_script_text_in_the_context_is_escaped_in_the_html(report):
    text = report["html"].read_text(encoding="utf-8")
    assert "<script>" not in text
    assert html.escape(CONTEXT["git_commit"]) in text
    assert html.escape(CONTEXT["registry"]["reason"]) in text


def test_context_scalars_registry_and_dotted_params_each_get_a_table(report):
    for tables in (_markdown_tables(report["markdown"].read_text(encoding="utf-8")),
                   _Tables(report["html"].read_text(encoding="utf-8")).tables):
        facts = dict(_table_starting(tables, "fact")[1:])
        assert facts["teacher"] == CONTEXT["teacher"] and facts["steps"] == "4"
        assert facts["git_commit"] == CONTEXT["git_commit"] and "registry" not in facts and "params" not in facts
        registry = dict(_table_starting(tables, "key")[1:])
        assert registry == {"model": "tokenbridge-student", "version": "3", "candidate": "yes", "champion_moved": "no",
                            "champion_version": "2", "reason": CONTEXT["registry"]["reason"]}
        params = dict(_table_starting(tables, "parameter")[1:])
        assert params == {"distill.steps": "4", "distill.learning_rate": format_value(5e-05),
                          "distill.alm.temperature": "1.0000", "evaluate.limit": "10"}
    assert "## Model Registry" in report["markdown"].read_text(encoding="utf-8")


def test_rendering_again_replaces_the_files_leaves_others_and_no_temporaries(tmp_path, history):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "registry.json").write_text("{}")
    render_report(METRICS, history, CONTEXT, out)
    paths = render_report(METRICS, history, {"profile": "tiny"}, out)
    assert (out / "registry.json").read_text() == "{}"
    assert "tiny" in paths["markdown"].read_text(encoding="utf-8")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "plots", "plots/loss_curves.png", "plots/metrics_by_model.png", "registry.json", "report.html", "report.md"]


@pytest.mark.parametrize(("values", "expected"), [
    ([5.0, 0.4], True), ([5.0, 0.6], False), ([5.0, 0.0], False), ([5.0, -1.0, 0.01], False),
    ([float("nan"), 50.0, 2.0], True), ([], False)])
def test_log_scale_only_when_every_value_is_positive_and_they_span_over_ten_fold(values, expected):
    assert use_log_scale(values) is expected


def test_the_transfer_report_tables_the_hypernetwork_against_fvt_and_counts_its_wins(tmp_path):
    from tokenbridge.stages.report import render_transfer

    scores = {"gemma.original": {"bits_per_byte": 1.0}, "gemma.fvt": {"bits_per_byte": 2.0},
              "gemma.transferred": {"bits_per_byte": 1.5}, "ensemble": {"bits_per_byte": 0.9}}
    hypernet = {"base": {"bits_per_byte": 0.7}, "qwen.fvt": {"bits_per_byte": 0.9},
                "qwen.hypernet": {"bits_per_byte": 0.8}, "qwen.fvt_alm": {"bits_per_byte": 0.85},
                "qwen.hypernet_alm": {"bits_per_byte": 0.75}, "heldout.fvt": {"bits_per_byte": 1.1},
                "heldout.hypernet": {"bits_per_byte": 1.2}, "heldout.fvt_alm": {"bits_per_byte": 1.0},
                "heldout.hypernet_alm": {"bits_per_byte": 1.05}}
    paths = render_transfer(scores, {"gemma": {"fvt": {"exact": 3}, "steps": 2}}, ["gemma"], ["gemma"],
                            {"name": "ensemble"}, tmp_path, hypernet, {"identity_steps": 20, "steps": 8})
    assert paths["plot"].exists()
    text = (tmp_path / "transfer.md").read_text()
    assert "| tokenizer | FVT | hypernetwork | FVT + ALM | hypernetwork + ALM |" in text
    assert "| qwen | 0.9000 | 0.8000 | 0.8500 | 0.7500 |" in text
    assert "beats zero-shot FVT on 1 of 2 tokenizers: qwen." in text


def test_a_hypernetwork_win_inside_both_intervals_is_called_so(tmp_path):
    from tokenbridge.stages.report import render_transfer

    hypernet = {"base": {"bits_per_byte": 0.7},
                "qwen.fvt": {"bits_per_byte": 0.90, "bits_per_byte_low": 0.85, "bits_per_byte_high": 0.95},
                "qwen.hypernet": {"bits_per_byte": 0.88, "bits_per_byte_low": 0.83, "bits_per_byte_high": 0.93}}
    render_transfer({"ensemble": {"bits_per_byte": 0.9}}, {}, [], [], {"name": "ensemble"}, tmp_path, hypernet,
                    {"identity_steps": 20, "steps": 8})
    text = (tmp_path / "transfer.md").read_text()
    assert "| qwen | 0.9000 [0.8500, 0.9500] | 0.8800 [0.8300, 0.9300] |" in text
    assert "on 1 of 1 tokenizers: qwen (1 of them inside both 95 % intervals: qwen)." in text


def test_the_benchmarks_table_has_a_row_per_model_and_a_column_per_task_with_its_interval(tmp_path, history):
    """One table across evaluate.tasks: each cell is the task's headline metric +- 1.96 standard errors; a task a
    model did not run is a dash."""
    arithmetic = {"metric": "acc", "higher_is_better": True, "n": 100, "values": {"acc": 0.5, "acc_stderr": 0.05}}
    gsm = {"metric": "exact_match,strict-match", "higher_is_better": True, "n": 10,
           "values": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.1}}
    tasks = {"teacher": {"gsm": gsm, "arithmetic": arithmetic}, "student_after": {"arithmetic": arithmetic}}
    paths = render_report({**METRICS, "tasks": tasks}, history, CONTEXT, tmp_path / "reports")
    for tables in (_markdown_tables(paths["markdown"].read_text(encoding="utf-8")),
                   _Tables(paths["html"].read_text(encoding="utf-8")).tables):
        header, *rows = next(table for table in tables if "gsm: exact_match,strict-match (higher is better)"
                             in table[0])
        assert header == ["model", "gsm: exact_match,strict-match (higher is better)",
                          "arithmetic: acc (higher is better)"]
        assert rows == [["teacher", "0.2000 [0.0040, 0.3960]", "0.5000 [0.4020, 0.5980]"],
                        ["student_after", MISSING, "0.5000 [0.4020, 0.5980]"]]


def test_a_history_with_the_held_out_curve_gets_its_plot_from_the_untrained_student_at_step_0(tmp_path):
    from tokenbridge.stages.report import _heldout_curves, _read_history

    curve = ",heldout_bits_per_byte,heldout_bits_per_byte_low,heldout_bits_per_byte_high"
    path = tmp_path / "curve.csv"
    path.write_text("\n".join([HEADER + curve, "1,5.2,4.6,0.6,5e-05,1.5,,,", "2,2.1,1.8,0.3,5e-05,1.2,1.25,1.2,1.3",
                               "3,0.9,0.7,0.2,5e-05,1.0,,,", "4,0.4,0.3,0.1,5e-05,1.0,1.1172,1.08,1.15"]) + "\n")
    before = {**METRICS["models"]["student_before"], "bits_per_byte_low": 1.27, "bits_per_byte_high": 1.36}
    curves = _heldout_curves(_read_history(path), before)
    assert list(curves) == ["reference answers"], "the teacher's answers have no column here"
    assert sorted(curves["reference answers"]) == [0, 2, 4]
    assert curves["reference answers"][0] == {"bits_per_byte": 1.3125, "bits_per_byte_low": 1.27,
                                              "bits_per_byte_high": 1.36}, "step 0: the untrained student"
    assert curves["reference answers"][4] == {"bits_per_byte": 1.1172, "bits_per_byte_low": 1.08,
                                              "bits_per_byte_high": 1.15}
    paths = render_report(METRICS, path, CONTEXT, tmp_path / "r")
    assert paths["heldout_curve"].read_bytes().startswith(PNG_MAGIC)
    assert "held-out bits-per-byte as it trains" in paths["markdown"].read_text(encoding="utf-8")
