//! `ponder eval --sweep --plot`: accuracy against tokens as an SVG — the
//! fixed best-of-N curve with its intervals, pass@N above it, and each
//! rule's Pareto frontier with the calibrated (solid) and raw (dashed) PRM.

use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::frontier::{Frontier, family_name};
use super::points::{Estimator, PassAt, SweepPoint};
use crate::reasoning::rules::BudgetRule;

type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>;

/// The x axis' ticks: plotters' own log ticks crowd each decade's top.
const X_TICKS: [f64; 10] = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0];

/// What the plot shows: the fixed curve, pass@N and every family's frontier.
pub(super) struct PlotData<'a> {
    pub(super) title: String,
    pub(super) fixed: &'a [SweepPoint],
    pub(super) pass_at: &'a [PassAt],
    pub(super) frontiers: &'a [Frontier],
}

fn rule_color(rule: BudgetRule) -> RGBColor {
    match rule {
        BudgetRule::Ias => RGBColor(0x1f, 0x77, 0xb4),
        BudgetRule::Sequential => RGBColor(0xd6, 0x27, 0x28),
        BudgetRule::GiveUp => RGBColor(0x2c, 0xa0, 0x2c),
        BudgetRule::Vote => RGBColor(0x94, 0x67, 0xbd),
    }
}

/// The frontiers drawn: every rule with the calibrated PRM, the raw PRM's
/// beside them, and `vote` (no PRM). The oracle's are in the JSON only: they
/// sit near pass@N and would crowd the top of the plot.
fn plotted(f: &Frontier) -> bool {
    f.estimator != Estimator::Oracle
}

/// The plot as SVG text (written by the caller to a file it opened before
/// the run). Percent on the y axis; tokens as a fraction of fixed
/// best-of-N_max on a log x axis, since the interesting budgets span two
/// decades.
pub(super) fn svg(data: &PlotData<'_>) -> anyhow::Result<String> {
    let xs = data.fixed.iter().map(|p| p.tokens_vs_fixed_max).chain(
        data.frontiers
            .iter()
            .filter(|f| plotted(f))
            .flat_map(|f| f.points.iter().map(|p| p.tokens_vs_fixed_max)),
    );
    let x_min = xs.clone().filter(|&x| x > 0.0).fold(1.0f64, f64::min) * 0.8;
    let accuracies = data.fixed.iter().map(|p| p.accuracy_ci[0]).chain(
        data.frontiers
            .iter()
            .filter(|f| plotted(f))
            .flat_map(|f| f.points.iter().map(|p| p.summary.accuracy)),
    );
    let y_min = ((accuracies.fold(1.0f64, f64::min) * 10.0).floor() * 10.0).clamp(0.0, 90.0);

    let mut out = String::new();
    let root = SVGBackend::with_string(&mut out, (900, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&data.title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(
            (x_min..1.1)
                .log_scale()
                .with_key_points(X_TICKS.iter().copied().filter(|&t| t >= x_min).collect()),
            y_min..100.0,
        )?;
    chart
        .configure_mesh()
        .x_desc("tokens generated, fraction of fixed best-of-N_max (log scale)")
        .y_desc("accuracy (%)")
        .max_light_lines(1)
        .x_label_formatter(&|x| {
            if *x < 0.1 { format!("{:.1}%", x * 100.0) } else { format!("{:.0}%", x * 100.0) }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    draw_fixed(&mut chart, data)?;
    for f in data.frontiers.iter().filter(|f| plotted(f)) {
        draw_frontier(&mut chart, f)?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    drop(chart);
    drop(root);
    Ok(out)
}

/// The fixed curve with a 95% interval bar at each N, and pass@N (a
/// perfect selector over the same samples) dashed above it.
fn draw_fixed(chart: &mut Chart<'_, '_>, data: &PlotData<'_>) -> anyhow::Result<()> {
    let pts: Vec<(f64, f64)> =
        data.fixed.iter().map(|p| (p.tokens_vs_fixed_max, p.summary.accuracy * 100.0)).collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), BLACK.stroke_width(2)))?
        .label("fixed best-of-N (95% CI)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLACK.filled())))?;
    let bar = BLACK.mix(0.5).stroke_width(1);
    chart.draw_series(data.fixed.iter().map(|p| {
        let x = p.tokens_vs_fixed_max;
        PathElement::new(vec![(x, p.accuracy_ci[0] * 100.0), (x, p.accuracy_ci[1] * 100.0)], bar)
    }))?;
    let grey = BLACK.mix(0.45);
    let pass: Vec<(f64, f64)> =
        data.pass_at.iter().map(|p| (p.tokens_vs_fixed_max, p.accuracy * 100.0)).collect();
    chart
        .draw_series(DashedLineSeries::new(pass.clone(), 6, 4, grey.stroke_width(2)))?
        .label("pass@N (a right answer among the N)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    chart.draw_series(pass.into_iter().map(|p| TriangleMarker::new(p, 4, grey.filled())))?;
    Ok(())
}

fn draw_frontier(chart: &mut Chart<'_, '_>, f: &Frontier) -> anyhow::Result<()> {
    let pts: Vec<(f64, f64)> =
        f.points.iter().map(|p| (p.tokens_vs_fixed_max, p.summary.accuracy * 100.0)).collect();
    let name = family_name((f.rule, f.estimator));
    let color = rule_color(f.rule);
    if f.estimator == Estimator::Raw {
        let light = color.mix(0.5);
        chart
            .draw_series(DashedLineSeries::new(pts.clone(), 5, 4, light.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], light.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 2, light.filled())))?;
    } else {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::frontier::frontiers;
    use crate::eval::points::tests::{GRID, questions};
    use crate::eval::points::{Sweep, specs};

    #[test]
    fn the_plot_is_an_svg_with_every_series_in_its_legend() {
        let qs = questions();
        let sweep = Sweep::new(&qs, GRID);
        let fixed = sweep.fixed_curve();
        let pass_at = sweep.pass_at(&fixed);
        let points: Vec<SweepPoint> = specs(&GRID).iter().map(|s| sweep.rule_point(s)).collect();
        let frontiers = frontiers(&points);
        let data = PlotData { title: "test".into(), fixed: &fixed, pass_at: &pass_at, frontiers: &frontiers };
        let svg = svg(&data).expect("the plot is drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for label in ["fixed best-of-N", "pass@N", "sequential/calibrated", "give_up/raw", "vote"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(!svg.contains("oracle"));
    }
}
