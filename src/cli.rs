//! The command line: flags (each also an environment variable) that override the file.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{Config, ConfigError, LogFormat};

/// A TCP proxy with bounded per-connection buffers: memory stays flat however slow the
/// reader or the upstream. Flags override the configuration file.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    /// Configuration file (TOML). Without one, every key takes its default and
    /// --listen and --upstream are required.
    #[arg(short, long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept clients on (overrides listen.address).
    #[arg(long, env = "SLUICE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Upstream host:port to relay to (overrides upstream.address).
    #[arg(long, env = "SLUICE_UPSTREAM", value_name = "ADDR")]
    pub upstream: Option<String>,

    /// Address of the Prometheus endpoint (overrides metrics.address).
    #[arg(long, env = "SLUICE_METRICS", value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Log level or tracing filter, e.g. `debug` (overrides log.level).
    #[arg(long, env = "SLUICE_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format, text or json (overrides log.format).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormatArg>,

    /// Validate the configuration, print the effective result and exit without binding.
    #[arg(long)]
    pub check_config: bool,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl Cli {
    /// Reads the file (if any), applies the flags, validates. Used at start-up and on
    /// every reload, so a reload keeps the command line's overrides.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        let (mut config, source, text) = match &self.config {
            Some(path) => {
                let text = Config::read(path)?;
                let source = path.display().to_string();
                (Config::parse(&text, &source)?, source, Some(text))
            }
            None => (
                Config::parse("", "defaults")?,
                "command line".to_string(),
                None,
            ),
        };
        let overrides = [
            (
                "listen.address",
                "--listen",
                self.listen
                    .as_ref()
                    .map(|v| config.listen.address = v.clone()),
            ),
            (
                "upstream.address",
                "--upstream",
                self.upstream
                    .as_ref()
                    .map(|v| config.upstream.address = v.clone()),
            ),
            (
                "metrics.address",
                "--metrics",
                self.metrics
                    .as_ref()
                    .map(|v| config.metrics.address = v.clone()),
            ),
            (
                "log.level",
                "--log-level",
                self.log_level
                    .as_ref()
                    .map(|v| config.log.level = v.clone()),
            ),
        ];
        if let Some(f) = self.log_format {
            config.log.format = match f {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        config.validate(&source, text.as_deref()).map_err(|mut e| {
            if let Some((_, flag, _)) = overrides
                .iter()
                .find(|(key, _, set)| set.is_some() && e.key.as_deref() == Some(*key))
            {
                e.source = format!("command line {flag}");
                e.line = None;
            }
            e
        })?;
        Ok(config)
    }
}
