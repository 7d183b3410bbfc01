"""The two dashboards, built with grafana-foundation-sdk, and the JSON files they become.

``safety-overview``: what the detectors found, from PostgreSQL (the alerts, turns, verdicts and
silences tables): alerts over time by detector, severity, tenant and model, the latest alerts
with a link to the audit UI, the SAE features alerts cite, detector fire rates per 1,000 turns,
the false-positive share from triage and the fires that silences withheld.

``service-health``: how the sidecar runs, from Prometheus (``monitor/service/metrics.py``):
turns and tokens per second (API instances and Kafka workers), live alert rates, latency
percentiles, micro-batch sizes, the outbox and webhook deliveries, the workers' messages, lag
and errors, the false-positive share from triage and silences, process CPU and memory. Panels
that show what an alerting rule of ``deploy/prometheus/alerts.yml`` watches draw its threshold
(``*_ALERT`` below).

Both reference their data sources by fixed uids (``POSTGRES``, ``PROMETHEUS``), which
``dashboards/provisioning/datasources/safety-monitor.yaml`` defines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent
from typing import Any

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from monitor.service.metrics import TRIAGE_DAYS

POSTGRES = dm.DataSourceRef(type_val="grafana-postgresql-datasource", uid="safety-monitor-postgres")
PROMETHEUS = dm.DataSourceRef(type_val="prometheus", uid="safety-monitor-prometheus")
FOLDER_UID = "safety-monitor"
FOLDER_TITLE = "Safety monitor"
TAGS = ["safety-monitor"]
AUDIT_URL = "http://localhost:8000"
# The custom "All" value of the SQL variables. Grafana inserts a custom all value into the query
# as is (unquoted, unformatted), so it is written as an SQL string literal; every filter reads
# ``('__all' IN ($var) OR column IN ($var))``: no filter for All, an IN list otherwise, and an
# empty table of tenants still gives valid SQL.
SQL_ALL = "'__all'"
# Prometheus variables: All is the regex ``.*``, used as ``label=~"$var"``.
PROM_ALL = ".*"
Target = cogbuilder.Builder[cogvariants.Dataquery]
# The false-positive share from triage (false_positive / (true_positive + false_positive)):
# amber from 0.3, red from 0.5.
FP_SHARE_AMBER = 0.3
FP_SHARE_RED = 0.5
SEVERITY_COLORS = {
    "info": "blue",
    "low": "green",
    "medium": "yellow",
    "high": "orange",
    "critical": "red",
}


# ---- PostgreSQL queries -------------------------------------------------------------------------


class SqlQuery(cogvariants.Dataquery):
    """A raw-SQL target of Grafana's PostgreSQL data source (the SDK has no builder for it)."""

    def __init__(self, raw_sql: str, fmt: str, ref_id: str) -> None:
        self.raw_sql = raw_sql
        self.fmt = fmt
        self.ref_id = ref_id

    def to_json(self) -> dict[str, object]:
        return {
            "datasource": {"type": POSTGRES.type_val, "uid": POSTGRES.uid},
            "editorMode": "code",
            "format": self.fmt,
            "rawQuery": True,
            "rawSql": self.raw_sql,
            "refId": self.ref_id,
        }


class Sql(cogbuilder.Builder[SqlQuery]):
    def __init__(self, raw_sql: str, fmt: str = "time_series", ref_id: str = "A") -> None:
        sql = _layout(raw_sql)
        assert _CONT not in sql, sql
        self._internal = SqlQuery(sql, fmt, ref_id)

    def build(self) -> SqlQuery:
        return self._internal


# Continuation lines of an interpolated filter start with this mark; ``_layout`` indents them
# under the line they continue, whatever the indentation of the template they went into.
_CONT = "\x00"


def _layout(sql: str) -> str:
    """Dedent a query template and indent the filters interpolated into it."""
    lines = sql.strip("\n").split("\n")
    own = [ln for ln in lines if ln.strip() and not ln.startswith(_CONT)]
    cut = min((len(ln) - len(ln.lstrip(" ")) for ln in own[1:]), default=0)
    if own and own[0].startswith(" "):
        cut = min(cut, len(own[0]) - len(own[0].lstrip(" ")))
    out: list[str] = []
    indent = ""
    for raw in lines:
        if raw.startswith(_CONT):
            out.append(indent + "  " + raw[len(_CONT) :])
            continue
        line = raw[cut:] if raw[:cut].strip() == "" else raw.lstrip(" ")
        indent = line[: len(line) - len(line.lstrip(" "))]
        out.append(line.rstrip())
    return "\n".join(out).strip()


def _in(column: str, var: str) -> str:
    return f"({SQL_ALL} IN (${var}) OR {column} IN (${var}))"


def _where(alias: str = "", *, detector: bool = True) -> str:
    """The filters every alert panel shares: time range, tenant, model, detector."""
    p = f"{alias}." if alias else ""
    parts = [
        f"$__timeFilter({p}created_at)",
        _in(f"{p}tenant", "tenant"),
        _in(f"{p}pipeline", "pipeline"),
    ]
    if detector:
        parts.append(_in(f"{p}detector", "detector"))
    return f"\n{_CONT}AND ".join(parts)


def _alerts_by(column: str) -> str:
    return f"""
        SELECT $__timeGroupAlias(created_at, $__interval), {column} AS metric, count(*) AS alerts
        FROM alerts
        WHERE {_where()}
        GROUP BY 1, 2
        ORDER BY 1, 2
    """


def _sql_variable(name: str, label: str, query: str, description: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(POSTGRES)
        .query(dedent(query).strip())
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(SQL_ALL)
        .current(dm.VariableOption(text="All", value="$__all"))
    )


# ---- panel helpers ------------------------------------------------------------------------------


def _stacked_bars(title: str, description: str, unit: str = "short") -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .span(12)
        .height(8)
        .unit(unit)
        .min(0)
        .draw_style(cm.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .line_width(1)
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
        .tooltip(
            cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.RIGHT)
            .show_legend(True)
            .calcs(["sum"])
        )
    )


def _lines(title: str, description: str, unit: str) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .span(12)
        .height(8)
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .line_width(1)
        .tooltip(
            cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )


def _severity_colors(panel: timeseries.Panel) -> timeseries.Panel:
    for severity, color in SEVERITY_COLORS.items():
        panel = panel.override_by_name(
            severity,
            [dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})],
        )
    return panel


def _stat(title: str, description: str, unit: str = "short") -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .span(6)
        .height(4)
        .unit(unit)
        .graph_mode(cm.BigValueGraphMode.NONE)
        .color_mode(cm.BigValueColorMode.NONE)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
    )


def _fp_share_steps() -> list[dm.Threshold]:
    return [
        dm.Threshold(value=None, color="green"),
        dm.Threshold(value=FP_SHARE_AMBER, color="#EAB839"),
        dm.Threshold(value=FP_SHARE_RED, color="red"),
    ]


def _fp_share_thresholds() -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(_fp_share_steps())


def _table(title: str, description: str, span: int, height: int) -> table.Panel:
    return (
        table.Panel()
        .title(title)
        .description(description)
        .span(span)
        .height(height)
        .cell_height(cm.TableCellHeight.SM)
        .filterable(True)
    )


def _rate_by(metric: str, by: str, labels: str = "") -> str:
    """Per-second rate of a counter summed by one label, over the panel's rate interval."""
    selector = f"{{{labels}}}" if labels else ""
    return f"sum by ({by}) (rate({metric}{selector}[{RATE}]))"


def _per_minute(metric: str, by: str, labels: str = "") -> str:
    return f"60 * {_rate_by(metric, by, labels)}"


def _prom(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .editor_mode(pm.QueryEditorMode.CODE)
        .range()
        .datasource(PROMETHEUS)
    )


def _prom_variable(name: str, label: str, metric: str, description: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(PROMETHEUS)
        .query(f"label_values({metric}, {name})")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(PROM_ALL)
        .current(dm.VariableOption(text="All", value="$__all"))
    )


def _links() -> list[cogbuilder.Builder[dm.DashboardLink]]:
    return [
        db.DashboardLink("Safety monitor")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(TAGS)
        .as_dropdown(False)
        .keep_time(True)
        .include_vars(False)
        .target_blank(False)
    ]


# ---- safety overview (PostgreSQL) ---------------------------------------------------------------


def safety_overview() -> db.Dashboard:
    d = (
        db.Dashboard("Safety monitor: alerts")
        .uid("sm-safety-overview")
        .description(
            "What the detectors found: alerts, tenants, models and the SAE features behind them, "
            "from the service's PostgreSQL tables."
        )
        .tags(TAGS)
        .editable()
        .time("now-24h", "now")
        .refresh("1m")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .links(_links())
        .with_variable(
            _sql_variable(
                "tenant",
                "Tenant",
                """
                SELECT tenant FROM api_keys
                UNION
                SELECT tenant FROM alerts WHERE $__timeFilter(created_at)
                ORDER BY 1
                """,
                "Tenants with an API key or an alert in the time range.",
            )
        )
        .with_variable(
            _sql_variable(
                "pipeline",
                "Model",
                "SELECT DISTINCT pipeline FROM alerts WHERE $__timeFilter(created_at) ORDER BY 1",
                "The configured pipeline (model + SAE + catalog) that evaluated the turn.",
            )
        )
        .with_variable(
            _sql_variable(
                "detector",
                "Detector",
                "SELECT DISTINCT detector FROM alerts WHERE $__timeFilter(created_at) ORDER BY 1",
                "Detectors with an alert in the time range.",
            )
        )
        .with_variable(
            db.TextBoxVariable("audit_url")
            .label("Audit UI")
            .description("Base URL of the sidecar that serves the audit UI (/ui/conversations).")
            .default_value(AUDIT_URL)
            .current(dm.VariableOption(text=AUDIT_URL, value=AUDIT_URL))
        )
    )

    d = d.with_row(db.Row("Alerts"))
    d = d.with_panel(
        _stat("Alerts", "Alerts created in the time range (escalations included).").with_target(
            Sql(f"SELECT count(*) AS alerts FROM alerts WHERE {_where()}", "table")
        )
    )
    d = d.with_panel(
        _stat(
            "Alerted conversations", "Distinct conversations with at least one alert."
        ).with_target(
            Sql(
                f"""
                SELECT count(DISTINCT (tenant, conversation_id)) AS conversations
                FROM alerts
                WHERE {_where()}
                """,
                "table",
            )
        )
    )
    d = d.with_panel(
        _stat(
            "Turns", "Turns evaluated and stored (the detector filter does not apply)."
        ).with_target(
            Sql(f"SELECT count(*) AS turns FROM turns WHERE {_where(detector=False)}", "table")
        )
    )
    d = d.with_panel(
        _stat(
            "Fires folded by cooldown",
            "Detector fires counted on an earlier alert of the same conversation instead of "
            "making a new one (the rule's alerting.cooldown_seconds).",
        ).with_target(
            Sql(
                f"SELECT coalesce(sum(suppressed), 0) AS folded FROM alerts WHERE {_where()}",
                "table",
            )
        )
    )
    d = d.with_panel(
        _stacked_bars(
            "Alerts by detector",
            "Alerts per time bucket, stacked by detector. A bar is one $__interval bucket.",
        ).with_target(Sql(_alerts_by("detector")))
    )
    d = d.with_panel(
        _severity_colors(
            _stacked_bars("Alerts by severity", "Alerts per time bucket, stacked by severity.")
        ).with_target(Sql(_alerts_by("severity")))
    )
    d = d.with_panel(
        _stacked_bars("Alerts by tenant", "Alerts per time bucket, stacked by tenant.").with_target(
            Sql(_alerts_by("tenant"))
        )
    )
    d = d.with_panel(
        _stacked_bars(
            "Alerts by model", "Alerts per time bucket, stacked by pipeline (model)."
        ).with_target(Sql(_alerts_by("pipeline")))
    )

    d = d.with_row(db.Row("Tenants, models and detectors"))
    d = d.with_panel(
        _table(
            "Turns and alerts by tenant and model",
            "Per tenant and pipeline in the time range: turns, tokens, alerts, and alerts per "
            "1,000 turns.",
            12,
            9,
        ).with_target(
            Sql(
                f"""
                WITH t AS (
                  SELECT tenant, pipeline, count(*) AS turns, sum(n_tokens) AS tokens
                  FROM turns
                  WHERE {_where(detector=False)}
                  GROUP BY 1, 2
                ), a AS (
                  SELECT tenant, pipeline, count(*) AS alerts
                  FROM alerts
                  WHERE {_where()}
                  GROUP BY 1, 2
                )
                SELECT tenant, pipeline AS model, coalesce(t.turns, 0) AS turns,
                       coalesce(t.tokens, 0) AS tokens, coalesce(a.alerts, 0) AS alerts,
                       round(1000.0 * coalesce(a.alerts, 0) / nullif(t.turns, 0), 1)
                         AS alerts_per_1k_turns
                FROM t FULL OUTER JOIN a USING (tenant, pipeline)
                ORDER BY alerts DESC, turns DESC, tenant, model
                """,
                "table",
            )
        )
    )
    d = d.with_panel(
        _table(
            "Detector fires per 1,000 turns",
            "Fired verdicts (rules and probes, before cooldown and alert policy) per 1,000 "
            "evaluated turns, by detector.",
            12,
            9,
        ).with_target(
            Sql(
                f"""
                SELECT v.detector, v.kind,
                       count(*) FILTER (WHERE v.fired) AS fired, count(*) AS turns,
                       round(1000.0 * count(*) FILTER (WHERE v.fired) / count(*), 1)
                         AS fired_per_1k_turns
                FROM verdicts v JOIN turns t ON t.id = v.turn_id
                WHERE {_where("t", detector=False)}
                  AND {_in("v.detector", "detector")}
                GROUP BY 1, 2
                ORDER BY fired_per_1k_turns DESC, 1
                """,
                "table",
            )
        )
    )

    d = d.with_row(db.Row("Alert detail"))
    link = {
        "title": "Open the conversation in the audit UI",
        "url": "${audit_url}/ui/conversations/${__value.raw:percentencode}",
        "targetBlank": True,
    }
    d = d.with_panel(
        _table(
            "Latest alerts",
            "The newest 500 alerts. Click a conversation id to open it in the audit UI "
            "(the audit_url variable).",
            24,
            12,
        )
        .with_target(
            Sql(
                f"""
                SELECT created_at AS "time", tenant, pipeline AS model, detector, kind, severity,
                       round(score::numeric, 3) AS score, suppressed, conversation_id, summary,
                       id AS alert_id
                FROM alerts
                WHERE {_where()}
                ORDER BY created_at DESC, id
                LIMIT 500
                """,
                "table",
            )
        )
        .override_by_name("conversation_id", [dm.DynamicConfigValue(id_val="links", value=[link])])
        .override_by_name(
            "severity",
            [
                dm.DynamicConfigValue(
                    id_val="mappings",
                    value=[
                        {
                            "type": "value",
                            "options": {
                                s: {"color": c, "index": i}
                                for i, (s, c) in enumerate(SEVERITY_COLORS.items())
                            },
                        }
                    ],
                ),
                dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
            ],
        )
    )
    d = d.with_panel(
        _table(
            "Top features in alert evidence",
            "SAE features that alerts cite as evidence (each alert names its strongest few): "
            "how many alerts cite each, for which detectors, the mean of value / cutoff on "
            "rule alerts, and the largest value.",
            24,
            10,
        ).with_target(
            Sql(
                f"""
                SELECT (f ->> 'index')::int AS feature, f ->> 'label' AS label,
                       count(*) AS alerts,
                       string_agg(DISTINCT a.detector, ', ' ORDER BY a.detector) AS detectors,
                       round(avg((f ->> 'value')::numeric
                                 / nullif((f ->> 'cutoff')::numeric, 0))
                             FILTER (WHERE a.kind = 'rule'), 2) AS mean_value_over_cutoff,
                       round(max((f ->> 'value')::numeric), 3) AS max_value
                FROM alerts a
                CROSS JOIN LATERAL json_array_elements(a.evidence::json -> 'features') AS f
                WHERE {_where("a")}
                GROUP BY 1, 2
                ORDER BY alerts DESC, feature
                LIMIT 20
                """,
                "table",
            )
        )
    )

    d = d.with_row(db.Row("Triage and silences"))
    d = d.with_panel(
        _table(
            f"False-positive share by detector (triage, {TRIAGE_DAYS} days)",
            f"Of the alerts created in the {TRIAGE_DAYS} days up to the end of the time range "
            "that triage judged true_positive or false_positive, the share marked "
            "false_positive, per detector (1 - the precision that "
            "safety_monitor_triage_precision reports for every tenant). Amber from "
            f"{FP_SHARE_AMBER:g}, red from {FP_SHARE_RED:g}: recalibrate or backtest that "
            "detector first.",
            12,
            8,
        )
        .with_target(
            Sql(
                f"""
                SELECT detector, count(*) AS triaged,
                       count(*) FILTER (WHERE verdict = 'false_positive') AS false_positive,
                       round(count(*) FILTER (WHERE verdict = 'false_positive')::numeric
                             / count(*), 3) AS false_positive_share
                FROM alerts
                WHERE created_at > $__timeTo()::timestamptz - interval '{TRIAGE_DAYS} days'
                  AND created_at <= $__timeTo()
                  AND verdict IN ('true_positive', 'false_positive')
                  AND {_in("tenant", "tenant")}
                  AND {_in("pipeline", "pipeline")}
                  AND {_in("detector", "detector")}
                GROUP BY 1
                ORDER BY false_positive_share DESC, 1
                """,
                "table",
            )
        )
        .override_by_name(
            "false_positive_share",
            [
                dm.DynamicConfigValue(id_val="unit", value="percentunit"),
                dm.DynamicConfigValue(id_val="min", value=0),
                dm.DynamicConfigValue(id_val="max", value=1),
                dm.DynamicConfigValue(
                    id_val="thresholds",
                    value={
                        "mode": "absolute",
                        "steps": [{"color": t.color, "value": t.value} for t in _fp_share_steps()],
                    },
                ),
                dm.DynamicConfigValue(
                    id_val="custom.cellOptions", value={"type": "color-background"}
                ),
            ],
        )
    )
    d = d.with_panel(
        _stacked_bars(
            "Silenced fires by detector",
            "Fires an active silence withheld from alerting (stored and counted on the verdict, "
            "no alert made), per time bucket, stacked by detector.",
        )
        .span(8)
        .with_target(
            Sql(
                f"""
                SELECT $__timeGroupAlias(t.created_at, $__interval), v.detector AS metric,
                       count(*) AS fires
                FROM verdicts v JOIN turns t ON t.id = v.turn_id
                WHERE {_where("t", detector=False)}
                  AND {_in("v.detector", "detector")}
                  AND v.silence_id IS NOT NULL
                GROUP BY 1, 2
                ORDER BY 1, 2
                """
            )
        )
    )
    d = d.with_panel(
        _stat(
            "Active silences",
            "Silences in effect at the end of the time range (now, for a range ending now); "
            "a silence of every pipeline counts under any Model selection.",
        )
        .span(4)
        .with_target(
            Sql(
                f"""
                SELECT count(*) AS silences
                FROM silences
                WHERE starts_at <= $__timeTo() AND ends_at > $__timeTo()
                  AND {_in("tenant", "tenant")}
                  AND ({SQL_ALL} IN ($pipeline) OR pipeline IS NULL OR pipeline IN ($pipeline))
                  AND {_in("detector", "detector")}
                """,
                "table",
            )
        )
    )
    return d


# ---- service health (Prometheus) ----------------------------------------------------------------

PIPE = 'pipeline=~"$pipeline"'
DET = 'detector=~"$detector"'
RATE = "$__rate_interval"
# The thresholds of the alerting rules in deploy/prometheus/alerts.yml, drawn on the panels
# that show what each rule watches (tests/test_alert_rules.py checks that both agree).
OUTBOX_AGE_ALERT_S = 300  # SafetyMonitorOutboxStuck: oldest unpublished alert, seconds
DEAD_DELIVERIES_ALERT = 1  # SafetyMonitorWebhookDeadDeliveries: any dead-lettered delivery
CONSUMER_LAG_ALERT = 1000  # SafetyMonitorConsumerLag: messages behind on one partition
WORKER_ERRORS_ALERT_PER_S = 0.05  # SafetyMonitorWorkerErrors: errors per second of a worker
# Process metrics of the sidecar's own targets only (other exporters have them too).
OWN = "and on (job, instance) safety_monitor_outbox_backlog"


def _quantiles(metric: str) -> list[Target]:
    out: list[Target] = []
    for ref, q in (("A", "0.5"), ("B", "0.99")):
        expr = (
            f"histogram_quantile({q}, sum by (le, pipeline) "
            f"(rate({metric}_bucket{{{PIPE}}}[{RATE}])))"
        )
        out.append(_prom(expr, f"p{round(float(q) * 100)} {{{{pipeline}}}}", ref))
    return out


def _sizes(metric: str, at_least: int | None = None) -> list[Target]:
    """Mean and 99th percentile of a size histogram. ``histogram_quantile`` interpolates inside
    the lowest bucket from 0, so a size that is never below ``at_least`` is clamped to it."""
    mean = (
        f"sum by (pipeline) (rate({metric}_sum{{{PIPE}}}[{RATE}])) "
        f"/ sum by (pipeline) (rate({metric}_count{{{PIPE}}}[{RATE}]))"
    )
    p99 = (
        f"histogram_quantile(0.99, sum by (le, pipeline) (rate({metric}_bucket{{{PIPE}}}[{RATE}])))"
    )
    if at_least is not None:
        p99 = f"clamp_min({p99}, {at_least})"
    return [_prom(mean, "mean {{pipeline}}", "A"), _prom(p99, "p99 {{pipeline}}", "B")]


def _alert_steps(value: float) -> dict[str, Any]:
    """Green below an alerting rule's threshold, red from it (a field's ``thresholds``)."""
    return {
        "mode": "absolute",
        "steps": [{"color": "green", "value": None}, {"color": "red", "value": value}],
    }


def _alert_line(value: float) -> list[dm.DynamicConfigValue]:
    """Override properties that draw a rule's threshold as a dashed red line on a series."""
    return [
        dm.DynamicConfigValue(id_val="thresholds", value=_alert_steps(value)),
        dm.DynamicConfigValue(id_val="custom.thresholdsStyle", value={"mode": "dashed"}),
    ]


def _with_alert_line(panel: timeseries.Panel, value: float) -> timeseries.Panel:
    """Every series of ``panel`` against a rule's threshold, drawn as a dashed red line."""
    steps = _alert_steps(value)["steps"]
    return panel.thresholds(
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=t["value"], color=t["color"]) for t in steps])
    ).thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))


def service_health() -> db.Dashboard:
    d = (
        db.Dashboard("Safety monitor: service health")
        .uid("sm-service-health")
        .description(
            "How the sidecar runs: throughput, live alert rates, latency, micro-batches, alert "
            "delivery, from its Prometheus metrics (/metrics)."
        )
        .tags(TAGS)
        .editable()
        .time("now-1h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .links(_links())
        .with_variable(
            _prom_variable(
                "pipeline", "Model", "safety_monitor_turns_total", "Configured pipelines (models)."
            )
        )
        .with_variable(
            _prom_variable(
                "detector",
                "Detector",
                "safety_monitor_verdicts_total",
                "Detectors that fired since the instances started.",
            )
        )
    )

    d = d.with_row(db.Row("Traffic"))
    d = d.with_panel(
        _stat(
            "Turns / s",
            "Turns evaluated and stored per second, all instances: API and Kafka workers.",
            "reqps",
        )
        .decimals(2)
        .with_target(_prom(f"sum(rate(safety_monitor_turns_total{{{PIPE}}}[{RATE}]))", "turns/s"))
    )
    d = d.with_panel(
        _stat("Tokens / s", "Tokens through the pipelines per second, all instances.", "short")
        .decimals(0)
        .with_target(_prom(f"sum(rate(safety_monitor_tokens_total{{{PIPE}}}[{RATE}]))", "tokens/s"))
    )
    d = d.with_panel(
        _stat(
            "Outbox backlog",
            "Alerts stored but not yet published to Kafka. It only grows while Kafka is off "
            "(SAFETY_MONITOR_KAFKA_BOOTSTRAP unset) or unreachable.",
        ).with_target(_prom("max(safety_monitor_outbox_backlog)", "backlog"))
    )
    d = d.with_panel(
        _stat(
            "Oldest unpublished alert",
            "Age of the oldest alert still in the outbox (0 when empty); red from the "
            "SafetyMonitorOutboxStuck rule's threshold.",
            "s",
        )
        .color_mode(cm.BigValueColorMode.VALUE)
        .thresholds(
            db.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps(
                [dm.Threshold(color="green"), dm.Threshold(value=OUTBOX_AGE_ALERT_S, color="red")]
            )
        )
        .with_target(_prom("max(safety_monitor_outbox_oldest_age_seconds)", "age"))
    )
    d = d.with_panel(
        _lines(
            "Turns per second by model",
            "Turns evaluated and stored per second (API and Kafka workers).",
            "reqps",
        ).with_target(
            _prom(
                _rate_by("safety_monitor_turns_total", "pipeline", PIPE),
                "{{pipeline}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Tokens per second by model", "Tokens through the pipeline per second.", "short"
        ).with_target(
            _prom(
                _rate_by("safety_monitor_tokens_total", "pipeline", PIPE),
                "{{pipeline}}",
            )
        )
    )

    d = d.with_row(db.Row("Alerts (live)"))
    d = d.with_panel(
        _stacked_bars(
            "Alerts per minute by detector",
            "Alerts created per minute, stacked by detector (after cooldown; escalations "
            "included).",
            "opm",
        ).with_target(
            _prom(
                _per_minute("safety_monitor_alerts_total", "detector", f"{PIPE}, {DET}"),
                "{{detector}}",
            )
        )
    )
    d = d.with_panel(
        _severity_colors(
            _stacked_bars(
                "Alerts per minute by severity", "Alerts created per minute by severity.", "opm"
            )
        ).with_target(
            _prom(
                _per_minute("safety_monitor_alerts_total", "severity", f"{PIPE}, {DET}"),
                "{{severity}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Detector fires per minute",
            "Fired verdicts per minute by detector: rules and probes, before cooldown.",
            "opm",
        ).with_target(
            _prom(
                _per_minute("safety_monitor_verdicts_total", "detector", f"{PIPE}, {DET}"),
                "{{detector}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Requests refused per minute",
            "Requests refused before evaluation, by reason (too_large, unknown_pipeline, ...).",
            "opm",
        ).with_target(
            _prom(
                _per_minute("safety_monitor_requests_rejected_total", "reason"),
                "{{reason}}",
            )
        )
    )

    d = d.with_row(db.Row("Latency and micro-batches"))
    d = d.with_panel(
        _lines(
            "Pipeline latency per micro-batch",
            "Forward pass + SAE + detectors for one micro-batch: median and 99th percentile.",
            "s",
        ).targets(_quantiles("safety_monitor_pipeline_seconds"))
    )
    d = d.with_panel(
        _lines(
            "Turn request latency",
            "POST /v1/turns from request to stored: median and 99th percentile.",
            "s",
        ).targets(_quantiles("safety_monitor_turn_request_seconds"))
    )
    d = d.with_panel(
        _lines(
            "Turns per micro-batch",
            "How many concurrent turns shared a forward pass: mean and 99th percentile.",
            "short",
        ).targets(_sizes("safety_monitor_batch_turns", at_least=1))
    )
    d = d.with_panel(
        _lines(
            "Tokens per micro-batch",
            "Tokens per forward pass (a batch closes at batch_max_tokens): mean and 99th "
            "percentile.",
            "short",
        ).targets(_sizes("safety_monitor_batch_tokens"))
    )

    d = d.with_row(db.Row("Alert delivery and queues"))
    d = d.with_panel(
        _lines(
            "Outbox backlog and oldest age",
            "Unpublished alerts (left axis) and the age of the oldest (right axis; the dashed "
            "line is the SafetyMonitorOutboxStuck rule's threshold).",
            "short",
        )
        .with_target(_prom("max(safety_monitor_outbox_backlog)", "backlog", "A"))
        .with_target(_prom("max(safety_monitor_outbox_oldest_age_seconds)", "oldest age", "B"))
        .override_by_query(
            "B",
            [
                dm.DynamicConfigValue(id_val="unit", value="s"),
                dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
                *_alert_line(OUTBOX_AGE_ALERT_S),
            ],
        )
    )
    d = d.with_panel(
        _lines(
            "Alerts published per minute",
            "Alerts delivered per minute, by channel (kafka, webhook).",
            "opm",
        ).with_target(
            _prom(
                _per_minute("safety_monitor_alerts_published_total", "channel"),
                "{{channel}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Webhook failures per minute",
            "Failed webhook delivery attempts per minute (non-2xx answers, timeouts, refused "
            "connections); each is retried with backoff until webhook_max_attempts.",
            "opm",
        )
        .span(8)
        .with_target(
            _prom(
                _per_minute("safety_monitor_webhook_failures_total", "webhook"),
                "{{webhook}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Webhook deliveries waiting and dead-lettered",
            "Deliveries not yet made (pending) and given up after the last attempt (dead), per "
            "webhook. Dead ones are listed by GET /v1/webhooks/deliveries?status=dead and sent "
            "again by POST /v1/webhooks/deliveries/retry; any dead one fires the "
            "SafetyMonitorWebhookDeadDeliveries rule (the dashed line).",
            "short",
        )
        .span(8)
        .override_by_regexp(".* dead$", _alert_line(DEAD_DELIVERIES_ALERT))
        .with_target(
            _prom(
                "max by (webhook, state) (safety_monitor_webhook_deliveries)",
                "{{webhook}} {{state}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Batch turns waiting",
            "Turns accepted by POST /v1/turns/batch and not yet evaluated.",
            "short",
        )
        .span(8)
        .with_target(_prom("max(safety_monitor_pending_turns)", "pending"))
    )
    d = d.with_row(db.Row("Kafka workers"))
    d = d.with_panel(
        _lines(
            "Worker messages per minute",
            "Messages the workers read from the traffic topic per minute, by outcome: stored "
            "(new turns, counted in the turn rates above too), duplicate (stored before), "
            "dead_lettered (copied to <topic>.dlq).",
            "opm",
        )
        .span(8)
        .with_target(
            _prom(_per_minute("safety_monitor_worker_messages_total", "outcome"), "{{outcome}}")
        )
    )
    d = d.with_panel(
        _with_alert_line(
            _lines(
                "Consumer lag by partition",
                "Messages on each partition of the traffic topic not yet handled by the worker "
                "that holds it (end offset minus its last commit). The dashed line is the "
                "SafetyMonitorConsumerLag rule's threshold: add workers (up to the partition "
                "count) or look for one that is stuck.",
                "short",
            ).span(8),
            CONSUMER_LAG_ALERT,
        ).with_target(
            _prom(
                "max by (topic, partition) (safety_monitor_worker_consumer_lag)",
                "{{topic}} [{{partition}}]",
            )
        )
    )
    d = d.with_panel(
        _with_alert_line(
            _lines(
                "Worker errors per minute",
                "Failures the workers ride out per minute, by reason: database (turns held "
                "until it answers), offsets (lag unknown). The dashed line is one worker's "
                "rate at the SafetyMonitorWorkerErrors rule's threshold.",
                "opm",
            ).span(8),
            60 * WORKER_ERRORS_ALERT_PER_S,
        ).with_target(
            _prom(_per_minute("safety_monitor_worker_errors_total", "reason"), "{{reason}}")
        )
    )
    d = d.with_row(db.Row("Triage and silences"))
    d = d.with_panel(
        _lines(
            f"False-positive share by detector (triage, {TRIAGE_DAYS} days)",
            f"1 - safety_monitor_triage_precision: of the last {TRIAGE_DAYS} days' alerts judged "
            "true or false positive, the share marked false_positive, per detector (every "
            f"tenant). The dashed lines: amber from {FP_SHARE_AMBER:g}, red from "
            f"{FP_SHARE_RED:g}.",
            "percentunit",
        )
        .span(8)
        .max(1)
        .thresholds(_fp_share_thresholds())
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
        .with_target(
            _prom(
                f"1 - max by (detector) (safety_monitor_triage_precision{{{DET}}})",
                "{{detector}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Silenced fires per minute",
            "Fires an active silence withheld from alerting per minute, by detector (stored and "
            "counted, not alerted).",
            "opm",
        )
        .span(8)
        .with_target(
            _prom(
                _per_minute("safety_monitor_silenced_fires_total", "detector", f"{PIPE}, {DET}"),
                "{{detector}}",
            )
        )
    )
    d = d.with_panel(
        _lines(
            "Active silences",
            "Silences in effect per detector, every tenant (read from the database on each "
            "scrape).",
            "short",
        )
        .span(8)
        .with_target(
            _prom(f"max by (detector) (safety_monitor_active_silences{{{DET}}})", "{{detector}}")
        )
    )
    d = d.with_row(db.Row("Guard mode"))
    d = d.with_panel(
        _stacked_bars(
            "Proxied exchanges per minute",
            "Chat completions through guard mode per minute, by outcome (completed, blocked, "
            "aborted, disconnected, upstream_failed). Empty where no instance has an upstream.",
        )
        .span(8)
        .with_target(
            _prom(_per_minute("safety_monitor_guard_exchanges_total", "outcome"), "{{outcome}}")
        )
    )
    d = d.with_panel(
        _lines(
            "Guard actions per minute",
            "Blocked requests and aborted answers per minute, by detector; shadow=true: only "
            "recorded (the shadow policy), nothing was withheld.",
            "opm",
        )
        .span(8)
        .with_target(
            _prom(
                _per_minute("safety_monitor_guard_actions_total", "action, detector, shadow", DET),
                "{{action}} {{detector}} (shadow {{shadow}})",
            )
        )
    )
    failures = _lines(
        "Guard failures per minute",
        "Upstream calls that failed, exchanges let through unscored (scoring failed open), and "
        "exchanges that could not be recorded (alert SafetyMonitorGuardUnrecorded), per minute.",
        "opm",
    ).span(8)
    for ref, (metric, legend) in zip(
        "ABC",
        (
            ("safety_monitor_guard_upstream_errors_total", "upstream errors"),
            ("safety_monitor_guard_scoring_failures_total", "let through unscored"),
            ("safety_monitor_guard_unrecorded_total", "not recorded"),
        ),
        strict=True,
    ):
        failures = failures.with_target(_prom(f"60 * sum(rate({metric}[{RATE}]))", legend, ref))
    d = d.with_panel(failures)
    d = d.with_row(db.Row("Process"))
    d = d.with_panel(
        _lines("CPU", "CPU seconds per second of each sidecar process.", "short").with_target(
            _prom(f"rate(process_cpu_seconds_total[{RATE}]) {OWN}", "{{instance}}")
        )
    )
    d = d.with_panel(
        _lines(
            "Resident memory", "Resident set size of each sidecar process.", "bytes"
        ).with_target(_prom(f"process_resident_memory_bytes {OWN}", "{{instance}}"))
    )
    return d


# ---- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DashboardFile:
    name: str  # file name under dashboards/
    build: Callable[[], db.Dashboard]


DASHBOARDS = (
    DashboardFile("safety-overview.json", safety_overview),
    DashboardFile("service-health.json", service_health),
)


def _to_dict(d: db.Dashboard) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(d.build(), cls=JSONEncoder))
    doc["id"] = None
    for i, panel in enumerate(doc.get("panels", []), start=1):  # ids in layout order
        panel["id"] = i
    return doc


def build_all() -> dict[str, dict[str, Any]]:
    """File name → dashboard JSON model, for every dashboard."""
    return {f.name: _to_dict(f.build()) for f in DASHBOARDS}


def render(doc: dict[str, Any]) -> str:
    """The committed form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write(out_dir: Path) -> list[Path]:
    """Write every dashboard's JSON into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, doc in build_all().items():
        path = out_dir / name
        path.write_text(render(doc), encoding="utf-8")
        paths.append(path)
    return paths


def changed(out_dir: Path) -> list[str]:
    """Names of the dashboard files in ``out_dir`` that are missing or differ from the code."""
    stale = []
    for name, doc in build_all().items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(doc):
            stale.append(name)
    return stale
