//! report.svg: hand-written SVG line charts (memory, queued bytes and kernel socket memory over time, one line per run). No plotting dependency.

use std::fmt::Write as _;

use crate::units::format_bytes;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 250.0;
/// Room for the y-axis labels.
const LEFT: f64 = 90.0;
/// Room for the legend.
const RIGHT: f64 = 250.0;
const TOP: f64 = 70.0;
/// Space between panels (x-axis labels and the next title).
const GAP: f64 = 80.0;

/// One line on a chart.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    /// (seconds, bytes)
    pub points: Vec<(f64, f64)>,
    /// Drawn at the line's last point, e.g. "killed at 2 GiB cap".
    pub end_note: Option<String>,
}

/// One chart: a title, lines, and optionally a dashed horizontal limit.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
    /// (value, legend line 1, legend line 2)
    pub limit: Option<(f64, (String, String))>,
}

/// The dashed line of a panel's limit, in the chart and the legend.
const LIMIT_STROKE: &str = r##"stroke="#2ca02c" stroke-width="1.5" stroke-dasharray="6 4""##;

/// Renders the panels stacked, sharing the time axis range.
pub fn render(title: &str, subtitle: &str, panels: &[Panel]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP);
    let t_max = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    let time = nice_axis(t_max, 8);

    let mut svg = String::new();
    header(&mut svg, title, subtitle, height);
    for (i, panel) in panels.iter().enumerate() {
        let frame = Frame::new(i, panel, time);
        frame.title(&mut svg, &panel.title);
        frame.grid(&mut svg);
        frame.time_ticks(&mut svg);
        frame.axes(&mut svg);
        let mut legend = Legend {
            x: LEFT + frame.plot_w + 20.0,
            y: frame.top + 10.0,
        };
        if let Some((limit, label)) = &panel.limit {
            frame.limit(&mut svg, *limit);
            legend.entry(&mut svg, LIMIT_STROKE, &label.0, &label.1);
        }
        for s in panel.series.iter().filter(|s| !s.points.is_empty()) {
            frame.line(&mut svg, s);
            let peak = s.points.iter().map(|p| p.1).fold(0.0, f64::max);
            let stroke = format!(r#"stroke="{}" stroke-width="3""#, s.color);
            let note = format!("peak {}", format_bytes(peak as u64));
            legend.entry(&mut svg, &stroke, &s.label, &note);
            if let Some(note) = &s.end_note {
                frame.end_note(&mut svg, s, note);
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The `<svg>` element, a white background, the title and the subtitle.
fn header(svg: &mut String, title: &str, subtitle: &str, height: f64) {
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="18" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="50" fill="#555">{}</text>"##,
        esc(subtitle)
    );
}

/// Where one panel's plot stands and how values map onto it.
struct Frame {
    top: f64,
    bottom: f64,
    plot_w: f64,
    /// The time axis: tick step and maximum, seconds.
    t_step: f64,
    t_max: f64,
    /// The byte axis: its unit, tick step and maximum in that unit.
    unit: f64,
    unit_name: &'static str,
    y_step: f64,
    y_max_units: f64,
}

impl Frame {
    /// The `index`th panel's frame, its byte axis sized to `panel`'s values and limit.
    fn new(index: usize, panel: &Panel, (t_step, t_max): (f64, f64)) -> Frame {
        let top = TOP + index as f64 * (PANEL_HEIGHT + GAP) + 20.0;
        let y_data_max = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .chain(panel.limit.iter().map(|l| l.0))
            .fold(1.0f64, f64::max);
        let (unit, unit_name) = byte_unit(y_data_max);
        let (y_step, y_max_units) = nice_axis(y_data_max / unit, 5);
        Frame {
            top,
            bottom: top + PANEL_HEIGHT,
            plot_w: WIDTH - LEFT - RIGHT,
            t_step,
            t_max,
            unit,
            unit_name,
            y_step,
            y_max_units,
        }
    }

    fn x(&self, t: f64) -> f64 {
        LEFT + t / self.t_max * self.plot_w
    }

    fn y(&self, v: f64) -> f64 {
        self.bottom - v / (self.y_max_units * self.unit) * PANEL_HEIGHT
    }

    fn title(&self, svg: &mut String, title: &str) {
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
            self.top - 8.0,
            esc(title)
        );
    }

    /// Horizontal grid lines with the byte axis's labels.
    fn grid(&self, svg: &mut String) {
        let mut v = 0.0;
        while v <= self.y_max_units + 1e-9 {
            let py = self.y(v * self.unit);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#333">{} {}</text>"##,
                LEFT + self.plot_w,
                LEFT - 8.0,
                py + 4.0,
                trim_float(v),
                self.unit_name
            );
            v += self.y_step;
        }
    }

    /// The time axis's ticks, labels and name.
    fn time_ticks(&self, svg: &mut String) {
        let bottom = self.bottom;
        let mut t = 0.0;
        while t <= self.t_max + 1e-9 {
            let px = self.x(t);
            let _ = writeln!(
                svg,
                r##"<line x1="{px:.1}" y1="{bottom}" x2="{px:.1}" y2="{:.1}" stroke="#333"/><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#333">{}</text>"##,
                bottom + 5.0,
                bottom + 19.0,
                trim_float(t)
            );
            t += self.t_step;
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#333">time (s)</text>"##,
            LEFT + self.plot_w / 2.0,
            bottom + 36.0
        );
    }

    fn axes(&self, svg: &mut String) {
        let (top, bottom) = (self.top, self.bottom);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/><line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}" stroke="#333"/>"##,
            LEFT + self.plot_w
        );
    }

    /// A dashed horizontal line at `limit`.
    fn limit(&self, svg: &mut String, limit: f64) {
        let py = self.y(limit);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" {LIMIT_STROKE}/>"##,
            LEFT + self.plot_w
        );
    }

    /// A series' line through its points.
    fn line(&self, svg: &mut String, s: &Series) {
        let mut path = String::new();
        for (j, (t, v)) in s.points.iter().enumerate() {
            let _ = write!(
                path,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { " L" },
                self.x(*t),
                self.y(*v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<path d="{path}" fill="none" stroke="{}" stroke-width="2.2" stroke-linejoin="round"/>"#,
            s.color
        );
    }

    /// A dot at a series' last point with `note` beside it, on the side with room.
    fn end_note(&self, svg: &mut String, s: &Series, note: &str) {
        let Some((t, v)) = s.points.last() else {
            return;
        };
        let (px, py) = (self.x(*t), self.y(*v));
        let near_right = px > LEFT + self.plot_w * 0.7;
        let _ = writeln!(
            svg,
            r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="{}" fill="{}">{}</text>"#,
            s.color,
            px + if near_right { -8.0 } else { 8.0 },
            (py + 16.0).min(self.bottom - 4.0),
            if near_right { "end" } else { "start" },
            s.color,
            esc(note)
        );
    }
}

/// The legend right of a panel: where its next entry goes.
struct Legend {
    x: f64,
    y: f64,
}

impl Legend {
    /// A sample of the line (drawn with `stroke`), `label`, and a grey `note` under it.
    fn entry(&mut self, svg: &mut String, stroke: &str, label: &str, note: &str) {
        let (x, y) = (self.x, self.y);
        let _ = writeln!(
            svg,
            r##"<line x1="{x}" y1="{y}" x2="{:.1}" y2="{y}" {stroke}/><text x="{:.1}" y="{:.1}">{}</text><text x="{:.1}" y="{:.1}" fill="#555">{}</text>"##,
            x + 24.0,
            x + 30.0,
            y + 4.0,
            esc(label),
            x + 30.0,
            y + 19.0,
            esc(note)
        );
        self.y += 40.0;
    }
}

/// A 1-2-5 step giving about `ticks` intervals, and the axis maximum (a multiple of the step).
fn nice_axis(max: f64, ticks: u32) -> (f64, f64) {
    let raw = (max / ticks as f64).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil().max(1.0) * step)
}

/// The unit for a byte axis whose largest value is `max`.
fn byte_unit(max: f64) -> (f64, &'static str) {
    const KIB: f64 = 1024.0;
    if max >= KIB * KIB * KIB {
        (KIB * KIB * KIB, "GiB")
    } else if max >= 2.0 * KIB * KIB {
        (KIB * KIB, "MiB")
    } else if max >= 2.0 * KIB {
        (KIB, "KiB")
    } else {
        (1.0, "B")
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(9.3, 8), (2.0, 10.0));
        assert_eq!(nice_axis(3.0, 8), (0.5, 3.0));
        assert_eq!(nice_axis(1900.0, 5), (500.0, 2000.0));
    }

    #[test]
    fn renders_well_formed_svg() {
        let svg = render(
            "t <1>",
            "sub",
            &[Panel {
                title: "RSS".into(),
                series: vec![Series {
                    label: "sluice".into(),
                    color: "#1f77b4",
                    points: vec![(0.0, 1e6), (1.0, 2e6)],
                    end_note: Some("end".into()),
                }],
                limit: Some((3e6, ("bound".into(), "3 MB".into()))),
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("MiB"));
    }
}
