//! Delay distributions for the simulated operator: how long until an alarm is answered, and until it is resolved.
//!
//! Sampling is pure: the caller passes the (seeded) random number generator, so a run is reproducible.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;
use rand_distr::{Exp1, StandardNormal};

/// The forms [`Delay::from_str`] accepts, quoted in every parse error.
const FORMS: &str = "fixed:2s, uniform:5s..30s, exp:20s or lognormal:30s,0.5 (units ms, s, m)";

/// A sampled delay never exceeds this, so a long-tailed distribution cannot park a task for ever.
pub const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// A distribution of delays.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Delay {
    /// Always the same delay (`fixed:2s`).
    Fixed(Duration),
    /// Uniform between `min` and `max`, both inclusive (`uniform:5s..30s`).
    Uniform { min: Duration, max: Duration },
    /// Exponential with the given mean (`exp:20s`).
    Exponential { mean: Duration },
    /// Log-normal with the given median and shape `sigma` (`lognormal:30s,0.5`).
    LogNormal { median: Duration, sigma: f64 },
}

impl Delay {
    /// Draws one delay, capped at [`MAX_DELAY`].
    ///
    /// A `Uniform` whose `min` is above its `max` yields `min`; a negative or non-finite `sigma` is treated
    /// as 0 (use [`Delay::problem`] to reject such values up front).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let drawn = match *self {
            Delay::Fixed(delay) => delay,
            Delay::Uniform { min, max } if min >= max => min,
            Delay::Uniform { min, max } => rng.gen_range(min..=max),
            Delay::Exponential { mean } => {
                let unit: f64 = rng.sample(Exp1);
                secs_to_duration(mean.as_secs_f64() * unit)
            }
            Delay::LogNormal { median, sigma } => {
                let z: f64 = rng.sample(StandardNormal);
                let sigma = if sigma.is_finite() && sigma > 0.0 {
                    sigma
                } else {
                    0.0
                };
                secs_to_duration(median.as_secs_f64() * (sigma * z).exp())
            }
        };
        drawn.min(MAX_DELAY)
    }

    /// What is wrong with a hand-built value, if anything (parsed values are always fine).
    pub fn problem(&self) -> Option<String> {
        match *self {
            Delay::Uniform { min, max } if min > max => Some(format!(
                "uniform minimum {} is greater than maximum {}",
                DisplayDuration(min),
                DisplayDuration(max)
            )),
            Delay::LogNormal { sigma, .. } if !(sigma.is_finite() && sigma >= 0.0) => Some(
                format!("lognormal sigma {sigma} is not a non-negative number"),
            ),
            _ => None,
        }
    }
}

fn secs_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(MAX_DELAY)
}

/// Why a delay string could not be parsed. Every message names the input and the accepted forms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DelayParseError {
    #[error("invalid delay {input:?}: expected KIND:ARGS, one of {forms}", forms = FORMS)]
    Form { input: String },
    #[error("invalid delay {input:?}: unknown kind {kind:?}; expected {forms}", forms = FORMS)]
    UnknownKind { input: String, kind: String },
    #[error(
        "invalid delay {input:?}: {value:?} is not a duration; \
         expected a non-negative number with a unit ms, s or m (e.g. 250ms, 2s, 1.5m)"
    )]
    Duration { input: String, value: String },
    #[error("invalid delay {input:?}: uniform takes MIN..MAX, e.g. uniform:5s..30s")]
    UniformArgs { input: String },
    #[error("invalid delay {input:?}: uniform minimum {min} is greater than maximum {max}")]
    UniformOrder {
        input: String,
        min: String,
        max: String,
    },
    #[error("invalid delay {input:?}: lognormal takes MEDIAN,SIGMA, e.g. lognormal:30s,0.5")]
    LogNormalArgs { input: String },
    #[error("invalid delay {input:?}: lognormal sigma {value:?} is not a non-negative number")]
    Sigma { input: String, value: String },
}

impl FromStr for Delay {
    type Err = DelayParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let owned = || input.to_owned();
        let (kind, args) = input
            .split_once(':')
            .ok_or_else(|| DelayParseError::Form { input: owned() })?;
        let duration = |value: &str| {
            parse_duration(value).ok_or_else(|| DelayParseError::Duration {
                input: owned(),
                value: value.trim().to_owned(),
            })
        };
        match kind.trim().to_ascii_lowercase().as_str() {
            "fixed" => Ok(Delay::Fixed(duration(args)?)),
            "uniform" => {
                let (min, max) = args
                    .split_once("..")
                    .ok_or_else(|| DelayParseError::UniformArgs { input: owned() })?;
                let (min, max) = (duration(min)?, duration(max)?);
                if min > max {
                    return Err(DelayParseError::UniformOrder {
                        input: owned(),
                        min: DisplayDuration(min).to_string(),
                        max: DisplayDuration(max).to_string(),
                    });
                }
                Ok(Delay::Uniform { min, max })
            }
            "exp" | "exponential" => Ok(Delay::Exponential {
                mean: duration(args)?,
            }),
            "lognormal" => {
                let (median, sigma) = args
                    .split_once(',')
                    .ok_or_else(|| DelayParseError::LogNormalArgs { input: owned() })?;
                let median = duration(median)?;
                let sigma_text = sigma.trim();
                let sigma = sigma_text
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| DelayParseError::Sigma {
                        input: owned(),
                        value: sigma_text.to_owned(),
                    })?;
                Ok(Delay::LogNormal { median, sigma })
            }
            other => Err(DelayParseError::UnknownKind {
                input: owned(),
                kind: other.to_owned(),
            }),
        }
    }
}

/// Parses `250ms`, `2s`, `1.5m`: a non-negative finite number and a unit.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        return None;
    };
    // `f64::from_str` also takes "inf", "nan" and signs; only plain decimals are durations here.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    Duration::try_from_secs_f64(value * scale).ok()
}

impl fmt::Display for Delay {
    /// Writes the form [`Delay::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Delay::Fixed(d) => write!(f, "fixed:{}", DisplayDuration(d)),
            Delay::Uniform { min, max } => {
                write!(
                    f,
                    "uniform:{}..{}",
                    DisplayDuration(min),
                    DisplayDuration(max)
                )
            }
            Delay::Exponential { mean } => write!(f, "exp:{}", DisplayDuration(mean)),
            Delay::LogNormal { median, sigma } => {
                write!(f, "lognormal:{},{sigma}", DisplayDuration(median))
            }
        }
    }
}

/// A duration in the units the parser reads: whole seconds as `s`, whole milliseconds as `ms`.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}s", d.as_secs_f64())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn parses_every_form() {
        assert_eq!("fixed:2s".parse(), Ok(Delay::Fixed(ms(2000))));
        assert_eq!("fixed:20ms".parse(), Ok(Delay::Fixed(ms(20))));
        assert_eq!("fixed:1.5m".parse(), Ok(Delay::Fixed(ms(90_000))));
        assert_eq!(
            "uniform:5s..30s".parse(),
            Ok(Delay::Uniform {
                min: ms(5000),
                max: ms(30_000)
            })
        );
        assert_eq!(
            "exp:20s".parse(),
            Ok(Delay::Exponential { mean: ms(20_000) })
        );
        assert_eq!(
            " lognormal:30s,0.5 ".parse(),
            Ok(Delay::LogNormal {
                median: ms(30_000),
                sigma: 0.5
            })
        );
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in [
            "",
            "2s",
            "fixed:",
            "fixed:2",
            "fixed:-2s",
            "fixed:infs",
            "fixed:2h",
            "gamma:2s",
            "uniform:5s",
            "uniform:30s..5s",
            "exp:abc",
            "lognormal:30s",
            "lognormal:30s,-1",
            "lognormal:30s,nan",
        ] {
            let err = bad.parse::<Delay>().expect_err(bad);
            let message = err.to_string();
            assert!(message.starts_with("invalid delay"), "{bad}: {message}");
        }
        let message = "gamma:2s".parse::<Delay>().unwrap_err().to_string();
        assert!(message.contains("fixed:2s"), "{message}");
        let message = "fixed:2h".parse::<Delay>().unwrap_err().to_string();
        assert!(message.contains("ms, s or m"), "{message}");
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "fixed:2s",
            "fixed:20ms",
            "uniform:5s..30s",
            "exp:20s",
            "lognormal:30s,0.5",
        ] {
            let delay: Delay = text.parse().unwrap();
            assert_eq!(delay.to_string(), text);
            assert_eq!(delay.to_string().parse::<Delay>().unwrap(), delay);
        }
    }

    #[test]
    fn samples_are_reproducible_and_in_range() {
        let uniform = Delay::Uniform {
            min: ms(5),
            max: ms(30),
        };
        let draw = |delay: Delay| {
            let mut rng = StdRng::seed_from_u64(9);
            (0..50).map(|_| delay.sample(&mut rng)).collect::<Vec<_>>()
        };
        let first = draw(uniform);
        assert_eq!(first, draw(uniform));
        assert!(first.iter().all(|d| *d >= ms(5) && *d <= ms(30)));

        let exp = draw(Delay::Exponential { mean: ms(100) });
        let mean = exp.iter().sum::<Duration>() / 50;
        assert!(mean > ms(40) && mean < ms(250), "{mean:?}");

        let lognormal = Delay::LogNormal {
            median: ms(100),
            sigma: 0.0,
        };
        assert!(draw(lognormal).iter().all(|d| *d == ms(100)));
    }

    #[test]
    fn hand_built_problems_are_reported_and_never_panic() {
        let backwards = Delay::Uniform {
            min: ms(30),
            max: ms(5),
        };
        assert!(backwards.problem().is_some());
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(backwards.sample(&mut rng), ms(30));
        let odd = Delay::LogNormal {
            median: ms(10),
            sigma: f64::NAN,
        };
        assert!(odd.problem().is_some());
        assert_eq!(odd.sample(&mut rng), ms(10));
        assert_eq!(Delay::Fixed(ms(1)).problem(), None);
    }
}
