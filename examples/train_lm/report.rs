//! What the run prints and draws: the SHA-256 of the vars, the step timings, the loss plot.

use std::path::Path;

use candle_core::{Result, Var};
use candle_nn::VarMap;
use sha2::{Digest, Sha256};

/// The vars sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?;
    let mut vars: Vec<_> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(vars)
}

/// SHA-256 of every var's bytes (F32, little-endian), vars in name order.
pub fn params_sha256(varmap: &VarMap) -> Result<String> {
    let mut h = Sha256::new();
    for (_, var) in sorted_vars(varmap)? {
        for x in var.flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Per-step timings in milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub forward_backward: Vec<f64>,
    pub clip: Vec<f64>,
    pub optimizer: Vec<f64>,
}

impl Timings {
    /// Means over the steps after the first (which warms up allocations and caches).
    pub fn means(&self) -> (f64, f64, f64) {
        let mean = |v: &[f64]| {
            let v = if v.len() > 1 { &v[1..] } else { v };
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        (
            mean(&self.forward_backward),
            mean(&self.clip),
            mean(&self.optimizer),
        )
    }
}

/// Loss against step, one line per run.
pub fn plot(path: &Path, runs: &[(String, Vec<(u64, f32)>)], title: &str) -> anyhow::Result<()> {
    use plotters::prelude::*;

    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| anyhow::anyhow!("could not load the embedded DejaVu Sans font"))?;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let all = runs.iter().flat_map(|(_, r)| r.iter());
    let (mut hi, mut last) = (0f64, 1u64);
    for &(s, l) in all {
        if l.is_finite() {
            hi = hi.max(l as f64);
        }
        last = last.max(s);
    }
    if hi <= 0.0 {
        hi = 10.0;
    }
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..last + 1, 0f64..hi * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("training loss (cross-entropy, nats per byte)")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
    ];
    for (i, (label, run)) in runs.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points = run
            .iter()
            .filter(|(_, l)| l.is_finite() && *l > 0.0)
            .map(|&(s, l)| (s, l as f64));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}
