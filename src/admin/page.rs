//! The box's own web page, built into the binary: one HTML file, its script and its style.
//! It loads nothing from anywhere else and needs no internet; it reads `/events`.

pub const INDEX: &str = include_str!("page/index.html");
pub const SCRIPT: &str = include_str!("page/app.js");
pub const STYLE: &str = include_str!("page/app.css");
