//! Completions as a picture (the PNG/SVG twin of `html`): each block shows
//! its heading and prompt, then the completion's tokens with soft ones on
//! orange, hard ones tinted blue by p_soft, and under every token a bar
//! whose height is the router's p_soft.
use super::plot::{plot_err, render, Chart};
use anyhow::{bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontDesc;
use std::path::Path;

/// One generated token as drawn (a Coconut thought: `thought`, no text).
pub struct TextToken {
    pub text: String,
    pub soft: bool,
    pub thought: bool,
    pub p_soft: f64,
    pub logp: f64,
    pub entropy: f64,
}

/// One completion: a heading, grey context lines (prompt, reference answer),
/// and its tokens.
pub struct TextBlock {
    pub heading: String,
    pub context: Vec<String>,
    pub tokens: Vec<TextToken>,
}

const WIDTH: u32 = 1100;
const MARGIN: i32 = 20;
const TOKEN_PX: u32 = 17;
const LINE_H: i32 = 30; // token line: text, then the p_soft bar
const BAR_MAX: i32 = 6;
const SOFT: RGBColor = RGBColor(255, 179, 71);
const HARD: RGBColor = RGBColor(70, 130, 180);

/// Draws `blocks` under `title` into a .png or .svg.
pub fn soft_text_image(path: &Path, title: &str, blocks: &[TextBlock]) -> Result<()> {
    if blocks.is_empty() {
        bail!("soft text {title:?}: no completions to draw");
    }
    super::font::ensure_registered()?;
    let page = Layout::new(title, blocks)?;
    render(path, &page)
}

/// Something to draw at a place: text (size, colour) or a box (colour, alpha).
enum Item {
    Text(i32, i32, String, u32, RGBColor),
    Box(i32, i32, i32, i32, RGBColor, f64),
}

struct Layout {
    items: Vec<Item>,
    height: u32,
}

impl Layout {
    fn new(title: &str, blocks: &[TextBlock]) -> Result<Layout> {
        let mut l = Flow {
            items: Vec::new(),
            x: MARGIN,
            y: MARGIN,
        };
        l.text_line(title, 22, BLACK)?;
        let legend = "orange: soft (next input is the top-k mixture); blue tint and the bar under each token: router p_soft";
        l.text_line(legend, 13, RGBColor(90, 90, 90))?;
        for b in blocks {
            l.y += 12;
            l.text_line(&b.heading, 17, BLACK)?;
            for c in &b.context {
                l.wrapped(c, 13, RGBColor(110, 110, 110))?;
            }
            l.tokens(&b.tokens)?;
            l.y += LINE_H;
        }
        Ok(Layout {
            height: (l.y + MARGIN) as u32,
            items: l.items,
        })
    }
}

/// The pen: where the next token goes.
struct Flow {
    items: Vec<Item>,
    x: i32,
    y: i32,
}

fn width_of(text: &str, px: u32) -> Result<i32> {
    let font = FontDesc::new(FontFamily::SansSerif, px as f64, FontStyle::Normal);
    // ab_glyph gives spaces no box: measure them between two letters.
    let w = |s: &str| font.box_size(s).map(|b| b.0 as i32).map_err(plot_err);
    let spaces = text.chars().filter(|&c| c == ' ').count() as i32;
    let space = w("a a")? - w("aa")?;
    let rest: String = text.chars().filter(|&c| c != ' ').collect();
    Ok(if rest.is_empty() { 0 } else { w(&rest)? } + spaces * space)
}

impl Flow {
    fn text_line(&mut self, text: &str, px: u32, color: RGBColor) -> Result<()> {
        self.items
            .push(Item::Text(MARGIN, self.y, text.to_string(), px, color));
        self.y += px as i32 + 8;
        Ok(())
    }

    /// Grey context, wrapped at word boundaries to the page width.
    fn wrapped(&mut self, text: &str, px: u32, color: RGBColor) -> Result<()> {
        for para in text.lines() {
            let mut line = String::new();
            for word in para.split(' ') {
                let candidate = if line.is_empty() {
                    word.to_string()
                } else {
                    format!("{line} {word}")
                };
                if width_of(&candidate, px)? > WIDTH as i32 - 2 * MARGIN && !line.is_empty() {
                    self.text_line(&line, px, color)?;
                    line = word.to_string();
                } else {
                    line = candidate;
                }
            }
            self.text_line(&line, px, color)?;
        }
        Ok(())
    }

    fn tokens(&mut self, tokens: &[TextToken]) -> Result<()> {
        self.x = MARGIN;
        for t in tokens {
            let text = if t.thought { "·" } else { t.text.as_str() };
            for (k, piece) in text.split('\n').enumerate() {
                if k > 0 {
                    self.newline();
                }
                self.token(piece, t)?;
            }
        }
        Ok(())
    }

    fn newline(&mut self) {
        self.x = MARGIN;
        self.y += LINE_H;
    }

    fn token(&mut self, piece: &str, t: &TextToken) -> Result<()> {
        // An empty piece (a lone newline) still shows its p_soft, as a sliver.
        let w = width_of(piece, TOKEN_PX)?.max(4);
        if self.x + w > WIDTH as i32 - MARGIN {
            self.newline();
        }
        let (top, h) = (self.y, TOKEN_PX as i32 + 4);
        let (color, alpha) = if t.soft {
            (SOFT, 1.0)
        } else {
            (HARD, t.p_soft.clamp(0.0, 1.0) * 0.6)
        };
        self.items
            .push(Item::Box(self.x, top, self.x + w, top + h, color, alpha));
        let bar = (t.p_soft.clamp(0.0, 1.0) * BAR_MAX as f64).round() as i32;
        let base = top + h + 2 + BAR_MAX;
        self.items.push(Item::Box(
            self.x,
            base - bar,
            self.x + w - 1,
            base,
            HARD,
            1.0,
        ));
        self.items.push(Item::Text(
            self.x,
            top + 1,
            piece.to_string(),
            TOKEN_PX,
            BLACK,
        ));
        self.x += w;
        Ok(())
    }
}

impl Chart for Layout {
    fn size(&self) -> (u32, u32) {
        (WIDTH, self.height)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()> {
        for item in &self.items {
            match item {
                Item::Box(x0, y0, x1, y1, c, a) if *a > 0.0 => root
                    .draw(&Rectangle::new(
                        [(*x0, *y0), (*x1, *y1)],
                        c.mix(*a).filled(),
                    ))
                    .map_err(plot_err)?,
                Item::Box(..) => {}
                Item::Text(x, y, s, px, c) if !s.trim().is_empty() => {
                    let style = ("sans-serif", *px as f64).into_font().color(c);
                    root.draw(&Text::new(s.clone(), (*x, *y), style))
                        .map_err(plot_err)?
                }
                Item::Text(..) => {}
            }
        }
        Ok(())
    }
}
