//! Evaluation of every method on held-out labels, written as `report.json`,
//! `report.md` and a reliability diagram (`reliability.svg`).

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::metrics::{self, OverUnder};

/// A prefix counts as good (for AUROC) when at least this share of its
/// continuations succeed.
pub const GOOD_THRESHOLD: f64 = 0.5;

#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub n: usize,
    pub brier: f64,
    pub ece: f64,
    pub auroc: Option<f64>,
    pub over_under: OverUnder,
    /// Fraction of labels at or above the 0.1 quantile (quantile methods only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q10_coverage: Option<f64>,
    /// The same on the labels' grid ([`metrics::coverage`]): a label of 0
    /// counts as covered by a quantile within half a label step of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q10_coverage_grid: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MethodReport {
    #[serde(flatten)]
    pub overall: Metrics,
    pub per_level: BTreeMap<u8, Metrics>,
    /// Per bin of 10: (count, mean prediction, mean label).
    pub reliability: Vec<(usize, f64, f64)>,
}

/// Point predictions (and, for quantile methods, the 0.1 quantile) of one method.
pub struct Predictions<'a> {
    pub name: &'a str,
    pub point: Vec<f64>,
    pub q10: Option<Vec<f64>>,
}

/// `label_step`: the labels' resolution (1 / N_MC), see [`metrics::coverage`].
pub fn compute(pred: &[f64], q10: Option<&[f64]>, label: &[f64], label_step: f64) -> Metrics {
    let positive: Vec<bool> = label.iter().map(|&y| y >= GOOD_THRESHOLD).collect();
    Metrics {
        n: label.len(),
        brier: metrics::brier(pred, label),
        ece: metrics::ece(pred, label),
        auroc: metrics::auroc(pred, &positive),
        over_under: metrics::over_under(pred, label),
        q10_coverage: q10.map(|q| metrics::coverage(q, label, 0.0)),
        q10_coverage_grid: q10.map(|q| metrics::coverage(q, label, label_step)),
    }
}

pub fn method_report(p: &Predictions<'_>, label: &[f64], levels: &[u8], label_step: f64) -> MethodReport {
    let mut per_level = BTreeMap::new();
    let mut distinct: Vec<u8> = levels.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    for l in distinct {
        let idx: Vec<usize> = (0..levels.len()).filter(|&i| levels[i] == l).collect();
        let pick = |v: &[f64]| idx.iter().map(|&i| v[i]).collect::<Vec<_>>();
        let q = p.q10.as_deref().map(pick);
        per_level.insert(l, compute(&pick(&p.point), q.as_deref(), &pick(label), label_step));
    }
    MethodReport {
        overall: compute(&p.point, p.q10.as_deref(), label, label_step),
        per_level,
        reliability: metrics::reliability(&p.point, label),
    }
}

fn fmt_opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.3}"))
}

/// The human-readable report.
pub fn markdown(
    title: &str,
    context: &[(String, String)],
    methods: &BTreeMap<String, MethodReport>,
) -> String {
    let mut s = format!("# {title}\n\n");
    for (k, v) in context {
        s.push_str(&format!("- {k}: {v}\n"));
    }
    s.push_str("\n## Held-out calibration\n\n| method | n | Brier | ECE | AUROC | over | under | over share | q10 coverage | on the label grid |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (name, m) in methods {
        let o = &m.overall;
        s.push_str(&format!(
            "| {name} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {:.2} | {} | {} |\n",
            o.n,
            o.brier,
            o.ece,
            fmt_opt(o.auroc),
            o.over_under.over,
            o.over_under.under,
            o.over_under.over_fraction,
            fmt_opt(o.q10_coverage),
            fmt_opt(o.q10_coverage_grid)
        ));
    }
    for name in ["calibrated", "raw"] {
        let Some(m) = methods.get(name) else { continue };
        s.push_str(&format!("\n### Per level: {name}\n\n| level | n | Brier | ECE | AUROC | over | under | q10 coverage | on the label grid |\n|---|---|---|---|---|---|---|---|---|\n"));
        for (level, l) in &m.per_level {
            s.push_str(&format!(
                "| {level} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {} | {} |\n",
                l.n,
                l.brier,
                l.ece,
                fmt_opt(l.auroc),
                l.over_under.over,
                l.over_under.under,
                fmt_opt(l.q10_coverage),
                fmt_opt(l.q10_coverage_grid)
            ));
        }
    }
    s.push_str(&format!(
        "\nAUROC counts a prefix as good when at least {GOOD_THRESHOLD} of its continuations succeed. \
         The calibrated method's point prediction is the mean its three quantiles imply (Swanson's rule: 0.3 q10 + 0.4 q50 + 0.3 q90); with labels that are mostly 0 or 1 the median alone jumps between them.\n\n![reliability](reliability.svg)\n"
    ));
    s
}

/// Mean label against mean prediction per bin, one line per method.
pub fn reliability_svg(path: &Path, methods: &BTreeMap<String, MethodReport>) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (640, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Reliability on held-out prefixes", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("predicted success probability (bin mean)")
        .y_desc("Monte-Carlo success rate (bin mean)")
        .draw()?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))?.label("perfect");
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (i, (name, m)) in methods.iter().enumerate() {
        let color = colors[i % colors.len()];
        let pts: Vec<(f64, f64)> = m.reliability.iter().filter(|b| b.0 > 0).map(|b| (b.1, b.2)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_written_as_markdown_and_an_svg_diagram() {
        let label = [0.0, 0.25, 1.0, 0.5, 0.75, 1.0];
        let levels = [1, 1, 1, 2, 2, 2];
        let p = Predictions {
            name: "calibrated",
            point: vec![0.1, 0.3, 0.9, 0.5, 0.6, 0.8],
            q10: Some(vec![0.0; 6]),
        };
        let mut methods = BTreeMap::new();
        methods.insert("calibrated".to_string(), method_report(&p, &label, &levels, 0.125));
        let m = &methods["calibrated"];
        assert_eq!(m.overall.q10_coverage, Some(1.0));
        assert_eq!(m.per_level.len(), 2);
        let md = markdown("t", &[("model".into(), "x".into())], &methods);
        assert!(md.contains("| calibrated | 6 |"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("r.svg");
        reliability_svg(&svg, &methods).unwrap();
        assert!(std::fs::read_to_string(svg).unwrap().starts_with("<svg"));
    }
}
