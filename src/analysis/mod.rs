//! Analysis: routing records as Polars frames, and the first charts.
//!
//! `frame` turns a rollout's token records into one row per generated token
//! (DESIGN.md, "Records"), builds frames from loosely typed per-step metric
//! rows and runs SQL over a frame; `files` reads and writes parquet and CSV.
//! `plot` draws the charts people want first (soft ratio and reward over
//! steps, the router's p_soft histogram, soft fraction by position, bars such
//! as soft ratio by token) to PNG or SVG files with Plotters; `font` embeds the
//! one font those charts use, so they draw the same on any machine; `html`
//! writes completions with their soft tokens highlighted.
pub mod blocks;
pub mod files;
pub mod font;
pub mod frame;
pub mod html;
pub mod plot;
pub mod plot_bars;
pub mod plot_panel;
pub mod plot_text;
pub mod report;
pub mod rows;
pub mod samples;
pub mod table;
pub mod tensorboard;
pub mod token_class;
