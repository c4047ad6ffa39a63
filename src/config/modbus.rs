//! `[[modbus]]`: Modbus RTU devices read (and written) over serial ports.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{
    baud, data_bits, duration, name_or_file_name, serial_name, stop_bits, valid_port_name, Parity,
};
use crate::mapping::{self, TopicFilter};

/// One Modbus RTU device (one unit address on one port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// `{name}` in topics. Default: the file name of `path`.
    #[serde(default, deserialize_with = "serial_name")]
    pub name: Option<String>,
    /// The port, e.g. a `/dev/serial/by-id/` link to an RS-485 adapter. Devices on one bus
    /// share it.
    pub path: PathBuf,
    #[serde(default = "default_baud", deserialize_with = "baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits", deserialize_with = "data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits", deserialize_with = "stop_bits")]
    pub stop_bits: u8,
    /// The device's address on the bus (1 to 247).
    #[serde(deserialize_with = "unit")]
    pub unit: u8,
    /// How often the registers are read.
    #[serde(default = "default_poll", deserialize_with = "duration")]
    pub poll: Duration,
    /// A value that has not changed is published again after this long.
    #[serde(default = "default_republish", deserialize_with = "duration")]
    pub republish: Duration,
    /// How long to wait for the device's reply once the request is on the wire.
    #[serde(default = "default_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Where values are published: `{name}` is the device, `{register}` the register's name.
    #[serde(deserialize_with = "value_topic")]
    pub topic: String,
    /// Messages on this topic (`{register}` a level of its own) write the register.
    #[serde(default, deserialize_with = "command_topic")]
    pub command_topic: Option<String>,
    /// `true`: every value also goes to the hub; `false`: never; absent: when the register's
    /// topic matches an `[[export]]` filter.
    pub export: Option<bool>,
    #[serde(default)]
    pub register: Vec<RegisterConfig>,
}

/// One `[[modbus.register]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// `{register}` in topics.
    #[serde(deserialize_with = "register_name")]
    pub name: String,
    pub kind: RegisterKind,
    /// The register's (or the first word's) address, counted from 0 as on the wire.
    pub address: u16,
    /// Default: `u16` for registers, `bool` for coils and discrete inputs.
    #[serde(rename = "type")]
    pub value_type: Option<ValueType>,
    /// The published value is the raw value × `scale`.
    #[serde(default, deserialize_with = "scale")]
    pub scale: Option<f64>,
}

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterKind {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl RegisterKind {
    /// Whether a command may write it.
    pub fn writable(self) -> bool {
        matches!(self, RegisterKind::Holding | RegisterKind::Coil)
    }

    /// Coils and discrete inputs are bits; the others are 16-bit words.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
            RegisterKind::Coil => "coil",
            RegisterKind::Discrete => "discrete",
        }
    }
}

/// How a register's words are read; 32-bit types take two words, the high word first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
}

impl ValueType {
    /// Words (or, for `bool`, bits) the value takes.
    pub fn width(self) -> u16 {
        match self {
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            _ => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
        }
    }
}

impl RegisterConfig {
    pub fn value_type(&self) -> ValueType {
        self.value_type.unwrap_or(if self.kind.is_bit() {
            ValueType::Bool
        } else {
            ValueType::U16
        })
    }
}

impl ModbusConfig {
    /// The device's name: `name`, or the file name of `path`.
    pub fn device_name(&self) -> String {
        name_or_file_name(self.name.as_deref(), &self.path)
    }

    /// The topic of `register` (a register's name, or `$state`).
    pub fn topic_of(&self, register: &str) -> String {
        self.topic
            .replace("{name}", &self.device_name())
            .replace("{register}", register)
    }

    /// `command_topic` as a filter: the device's name filled in, `+` for the register.
    pub fn command_filter(&self) -> Option<String> {
        self.command_topic.as_ref().map(|t| {
            t.replace("{name}", &self.device_name())
                .replace("{register}", "+")
        })
    }

    /// The level of `command_topic` that names the register.
    pub fn command_register_level(&self) -> Option<usize> {
        self.command_topic
            .as_ref()
            .and_then(|t| t.split('/').position(|l| l == "{register}"))
    }
}

fn default_baud() -> u32 {
    9_600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_poll() -> Duration {
    Duration::from_secs(1)
}
fn default_republish() -> Duration {
    Duration::from_secs(60)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}

fn unit<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let unit = u8::deserialize(d)?;
    if !(1..=247).contains(&unit) {
        return Err(serde::de::Error::custom(format!(
            "unit {unit} must be a device address from 1 to 247"
        )));
    }
    Ok(unit)
}

fn register_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = String::deserialize(d)?;
    if !valid_port_name(&name) {
        return Err(serde::de::Error::custom(format!(
            "register name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(name)
}

fn scale<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let scale = f64::deserialize(d)?;
    if !scale.is_finite() || scale == 0.0 {
        return Err(serde::de::Error::custom(format!(
            "scale {scale} must be a finite number other than 0"
        )));
    }
    Ok(Some(scale))
}

/// Checks that `{name}` and `{register}` are a template's only placeholders and that
/// `{register}` is a level of its own; returns it filled with samples.
fn fill(template: &str) -> Result<String, String> {
    if !template.split('/').any(|level| level == "{register}") {
        return Err(format!(
            "{template:?} needs {{register}} as a level of its own (e.g. \"sensors/{{name}}/{{register}}\")"
        ));
    }
    let filled = template
        .replace("{name}", "device")
        .replace("{register}", "register");
    if filled.contains('{') || filled.contains('}') {
        return Err(format!(
            "{template:?}: the only placeholders a topic may hold are {{name}} and {{register}}"
        ));
    }
    Ok(filled)
}

fn value_topic<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let topic = String::deserialize(d)?;
    let filled = fill(&topic).map_err(serde::de::Error::custom)?;
    mapping::topic_to_subject("x", &filled).map_err(serde::de::Error::custom)?;
    Ok(topic)
}

fn command_topic<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let topic = String::deserialize(d)?;
    let filled = fill(&topic).map_err(serde::de::Error::custom)?;
    if filled.contains(['+', '#']) {
        return Err(serde::de::Error::custom(format!(
            "{topic:?} must not hold wildcards: the register's level is the only one that varies"
        )));
    }
    TopicFilter::new(&filled).map_err(serde::de::Error::custom)?;
    Ok(Some(topic))
}

/// Checks of one device against itself (its registers) and against the devices before it;
/// `Err((key, message))` names the offending key of the device or of its `index`-th register.
pub(super) fn check(
    devices: &[ModbusConfig],
    i: usize,
    has_uplink: bool,
    serial_paths: &[PathBuf],
) -> Result<(), Problem> {
    let device = &devices[i];
    let name = device.device_name();
    if device.name.is_none() && !valid_port_name(&name) {
        return Err(Problem::device(
            "path",
            format!(
                "the device name taken from the path, {name:?}, is not usable \
                 (letters, digits, '-', '_', '.'); set `name`"
            ),
        ));
    }
    let earlier = &devices[..i];
    if earlier.iter().any(|d| d.device_name() == name) {
        let key = if device.name.is_some() {
            "name"
        } else {
            "path"
        };
        return Err(Problem::device(
            key,
            format!("a Modbus device named {name:?} is already configured; set `name`"),
        ));
    }
    if serial_paths.contains(&device.path) {
        return Err(Problem::device(
            "path",
            format!(
                "{} is a [[serial]] port; a port carries Modbus or framed data, not both",
                device.path.display()
            ),
        ));
    }
    for other in earlier.iter().filter(|d| d.path == device.path) {
        if other.unit == device.unit {
            return Err(Problem::device(
                "unit",
                format!(
                    "unit {} on {} is already configured (device {:?})",
                    device.unit,
                    device.path.display(),
                    other.device_name()
                ),
            ));
        }
        let line = |d: &ModbusConfig| (d.baud, d.data_bits, d.parity, d.stop_bits);
        if line(other) != line(device) {
            return Err(Problem::device(
                "baud",
                format!(
                    "devices on one bus ({}) need the same baud, data_bits, parity and stop_bits \
                     as device {:?}",
                    device.path.display(),
                    other.device_name()
                ),
            ));
        }
    }
    if device.export == Some(true) && !has_uplink {
        return Err(Problem::device(
            "export",
            "exporting Modbus values needs an [uplink] section to send to".to_owned(),
        ));
    }
    if device.register.is_empty() {
        return Err(Problem::device(
            "register",
            "a device needs at least one [[modbus.register]]".to_owned(),
        ));
    }
    for (j, r) in device.register.iter().enumerate() {
        if device.register[..j].iter().any(|e| e.name == r.name) {
            return Err(Problem::register(
                j,
                "name",
                format!("register {:?} is already named in this device", r.name),
            ));
        }
        let ty = r.value_type();
        if r.kind.is_bit() != (ty == ValueType::Bool) {
            return Err(Problem::register(
                j,
                "type",
                format!(
                    "a {} register holds {}, not {}",
                    r.kind.as_str(),
                    if r.kind.is_bit() {
                        "bool"
                    } else {
                        "u16, i16, u32, i32 or f32"
                    },
                    ty.as_str()
                ),
            ));
        }
        if r.scale.is_some() && ty == ValueType::Bool {
            return Err(Problem::register(
                j,
                "scale",
                "a bool cannot be scaled".to_owned(),
            ));
        }
        if u32::from(r.address) + u32::from(ty.width()) > 65_536 {
            return Err(Problem::register(
                j,
                "address",
                format!("{} at {} runs past address 65535", ty.as_str(), r.address),
            ));
        }
    }
    if let Some(filter) = device.command_filter() {
        if let Ok(f) = TopicFilter::new(&filter) {
            if let Some(r) = device
                .register
                .iter()
                .find(|r| f.matches(&device.topic_of(&r.name)))
            {
                return Err(Problem::device(
                    "command_topic",
                    format!(
                        "{filter:?} matches the value topic of register {:?}: values would be \
                         written back",
                        r.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What is wrong with a device: the key, in the device (`register: None`) or in its register.
pub(super) struct Problem {
    pub register: Option<usize>,
    pub key: &'static str,
    pub message: String,
}

impl Problem {
    fn device(key: &'static str, message: String) -> Problem {
        Problem {
            register: None,
            key,
            message,
        }
    }

    fn register(index: usize, key: &'static str, message: String) -> Problem {
        Problem {
            register: Some(index),
            key,
            message,
        }
    }
}
