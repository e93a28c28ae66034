use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes, written as a whole number of bytes or a string with a
/// binary unit: `512B`, `64KiB`, `1MiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub const fn kib(n: usize) -> Self {
        Self(n * 1024)
    }
    pub fn get(self) -> usize {
        self.0
    }
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: usize = num
            .parse()
            .map_err(|_| format!("size {s:?} must start with a whole number"))?;
        let per = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1024,
            "MiB" => 1024 * 1024,
            other => {
                return Err(format!(
                    "size {s:?} has unknown unit {other:?} (B, KiB, MiB)"
                ))
            }
        };
        n.checked_mul(per)
            .map(Self)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (unit, per) in [("MiB", 1024 * 1024), ("KiB", 1024)] {
            if self.0 >= per && self.0.is_multiple_of(per) {
                return write!(f, "{}{unit}", self.0 / per);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => usize::try_from(n)
                .map(Self)
                .map_err(|_| serde::de::Error::custom(format!("size {n} is too large"))),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn parses_and_prints_sizes() {
        for (text, bytes) in [
            ("512", 512),
            ("512B", 512),
            ("64KiB", 65536),
            ("1MiB", 1 << 20),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.get(), bytes, "{text}");
            assert_eq!(size.to_string().parse::<ByteSize>().unwrap(), size);
        }
        assert_eq!(ByteSize::kib(256).to_string(), "256KiB");
        for bad in ["", "KiB", "1KB", "1 GiB", "-1", "99999999999999999999MiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }
}
