//! The charts' font: DejaVu Sans, embedded so a chart never depends on the
//! fonts installed where it is drawn (plotters' `ab_glyph` text has no system
//! font lookup). License: assets/fonts/LICENSE-DejaVu.txt.
use anyhow::{anyhow, Result};
use plotters::style::{register_font, FontStyle};
use std::sync::OnceLock;

static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Family names plotters asks for: "sans-serif" is its default (axis labels,
/// legends); the others map to the same face so no text ever goes missing.
const FAMILIES: [&str; 3] = ["sans-serif", "serif", "monospace"];

/// Registers the font with plotters, once per process; later calls return the
/// first outcome.
pub fn ensure_registered() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for family in FAMILIES {
            register_font(family, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "the embedded DejaVu Sans font could not be parsed".to_string())?;
        }
        Ok(())
    })
    .clone()
    .map_err(|e| anyhow!("chart font: {e}"))
}
