//! Register values: raw words or bits to published text, and command text to what is written.
//! Pure functions, no I/O.

use crate::config::ValueType;

/// What a command writes: register words (high word first) or one coil.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Words(Vec<u16>),
    Coil(bool),
}

/// Why a command's text cannot be written to a register.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("{text:?} is not a {ty} value")]
    NotAValue { text: String, ty: &'static str },
    #[error("{text:?} is not a whole number of raw units (scale {scale})")]
    NotWhole { text: String, scale: f64 },
    #[error("{text:?} is outside what a {ty} holds")]
    OutOfRange { text: String, ty: &'static str },
}

/// The value of `raw` words (or bits) as published: a number, scaled, or `true`/`false`.
/// `raw` holds at least `ty.width()` entries.
pub fn format(ty: ValueType, scale: Option<f64>, raw: &[u16]) -> String {
    let word = |i: usize| raw.get(i).copied().unwrap_or(0);
    let long = (u32::from(word(0)) << 16) | u32::from(word(1));
    let integer = |n: i64| match scale {
        None => n.to_string(),
        Some(s) => {
            let decimals = decimals_of(s);
            std::format!("{:.*}", decimals, n as f64 * s)
        }
    };
    match ty {
        ValueType::Bool => (word(0) != 0).to_string(),
        ValueType::U16 => integer(i64::from(word(0))),
        ValueType::I16 => integer(i64::from(word(0) as i16)),
        ValueType::U32 => integer(i64::from(long)),
        ValueType::I32 => integer(i64::from(long as i32)),
        ValueType::F32 => {
            let v = f32::from_bits(long);
            match scale {
                None => v.to_string(),
                Some(s) => (v * s as f32).to_string(),
            }
        }
    }
}

/// Decimals that show every step of `scale` (0.1 → 1, 0.25 → 2, 10 → 0), at most 6.
fn decimals_of(scale: f64) -> usize {
    let shown = std::format!("{:.6}", scale.abs());
    let fraction = shown.split('.').nth(1).unwrap_or("");
    fraction.trim_end_matches('0').len()
}

/// The write that sets a register of type `ty` to the value `text` (in published units:
/// divided by `scale` before it is written).
pub fn parse(ty: ValueType, scale: Option<f64>, text: &str) -> Result<Write, ValueError> {
    let t = text.trim();
    let not_a_value = || ValueError::NotAValue {
        text: t.to_owned(),
        ty: ty.as_str(),
    };
    if ty == ValueType::Bool {
        return match t.to_ascii_lowercase().as_str() {
            "true" | "1" | "on" => Ok(Write::Coil(true)),
            "false" | "0" | "off" => Ok(Write::Coil(false)),
            _ => Err(not_a_value()),
        };
    }
    let number: f64 = t.parse().map_err(|_| not_a_value())?;
    if !number.is_finite() {
        return Err(not_a_value());
    }
    if ty == ValueType::F32 {
        let v = (number / scale.unwrap_or(1.0)) as f32;
        if !v.is_finite() {
            return Err(ValueError::OutOfRange {
                text: t.to_owned(),
                ty: ty.as_str(),
            });
        }
        let bits = v.to_bits();
        return Ok(Write::Words(vec![(bits >> 16) as u16, bits as u16]));
    }
    let raw = number / scale.unwrap_or(1.0);
    let rounded = raw.round();
    // A value between two raw steps is refused rather than written as a neighbour.
    if (raw - rounded).abs() > 1e-6 * raw.abs().max(1.0) {
        return Err(ValueError::NotWhole {
            text: t.to_owned(),
            scale: scale.unwrap_or(1.0),
        });
    }
    let (min, max) = match ty {
        ValueType::U16 => (0.0, f64::from(u16::MAX)),
        ValueType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
        ValueType::U32 => (0.0, f64::from(u32::MAX)),
        _ => (f64::from(i32::MIN), f64::from(i32::MAX)),
    };
    if !(min..=max).contains(&rounded) {
        return Err(ValueError::OutOfRange {
            text: t.to_owned(),
            ty: ty.as_str(),
        });
    }
    let n = rounded as i64;
    Ok(Write::Words(match ty {
        ValueType::U16 | ValueType::I16 => vec![n as u16],
        _ => vec![(n >> 16) as u16, n as u16],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_formatted_by_type_and_scale() {
        assert_eq!(format(ValueType::U16, None, &[234]), "234");
        assert_eq!(format(ValueType::U16, Some(0.1), &[234]), "23.4");
        assert_eq!(format(ValueType::I16, Some(0.1), &[0xFF16]), "-23.4");
        assert_eq!(format(ValueType::I16, None, &[0xFFFF]), "-1");
        assert_eq!(format(ValueType::U32, None, &[0x0001, 0x0002]), "65538");
        assert_eq!(format(ValueType::I32, None, &[0xFFFF, 0xFFFE]), "-2");
        assert_eq!(format(ValueType::U16, Some(10.0), &[5]), "50");
        assert_eq!(format(ValueType::U16, Some(0.25), &[3]), "0.75");
        let bits = 23.4f32.to_bits();
        assert_eq!(
            format(ValueType::F32, None, &[(bits >> 16) as u16, bits as u16]),
            "23.4"
        );
        assert_eq!(format(ValueType::Bool, None, &[1]), "true");
        assert_eq!(format(ValueType::Bool, None, &[0]), "false");
    }

    #[test]
    fn commands_round_trip_through_the_format() {
        for (ty, scale, raw) in [
            (ValueType::U16, None, vec![234]),
            (ValueType::U16, Some(0.1), vec![234]),
            (ValueType::I16, Some(0.1), vec![0xFF16]),
            (ValueType::U32, None, vec![1, 2]),
            (ValueType::I32, Some(0.01), vec![0xFFFF, 0xFFFE]),
            (ValueType::F32, None, {
                let b = (-1.5f32).to_bits();
                vec![(b >> 16) as u16, b as u16]
            }),
        ] {
            let text = format(ty, scale, &raw);
            assert_eq!(parse(ty, scale, &text), Ok(Write::Words(raw)), "{text}");
        }
        assert_eq!(parse(ValueType::Bool, None, " ON "), Ok(Write::Coil(true)));
        assert_eq!(parse(ValueType::Bool, None, "0"), Ok(Write::Coil(false)));
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        let e = |ty, scale, text| parse(ty, scale, text).unwrap_err().to_string();
        assert_eq!(
            e(ValueType::U16, None, "warm"),
            "\"warm\" is not a u16 value"
        );
        assert_eq!(
            e(ValueType::U16, None, "70000"),
            "\"70000\" is outside what a u16 holds"
        );
        assert_eq!(
            e(ValueType::U16, None, "-1"),
            "\"-1\" is outside what a u16 holds"
        );
        assert_eq!(
            e(ValueType::U16, Some(0.1), "2.35"),
            "\"2.35\" is not a whole number of raw units (scale 0.1)"
        );
        assert_eq!(
            e(ValueType::Bool, None, "maybe"),
            "\"maybe\" is not a bool value"
        );
        assert_eq!(e(ValueType::I16, None, "NaN"), "\"NaN\" is not a i16 value");
        assert_eq!(
            e(ValueType::F32, None, "1e39"),
            "\"1e39\" is outside what a f32 holds"
        );
    }
}
