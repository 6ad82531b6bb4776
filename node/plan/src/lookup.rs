//! Public lookup tables: small tables every node and coordinator hold the
//! same copy of, that a query may JOIN to its dataset by key (country to
//! region): built into the planner ([`PUBLIC_TABLES`]), or declared by a
//! partner for one dataset in `node.toml` and published with its schema in
//! `Describe` ([`Lookup`], [`crate::schema::Schema::lookups`]), so the
//! coordinator plans the same join. They are public metadata, like a
//! declared domain: a join to one only relabels or groups a dataset
//! column's values, so it is planned as a CASE bucket over that column (in
//! GROUP BY) or an IN list (in WHERE), with the sensitivities of any
//! GROUP BY or WHERE (DESIGN invariant 4). Joins between private datasets
//! are refused: a record could pair with any number of records of the
//! other, and no sensitivity would follow from the schemas.

/// A public lookup table: each key (a value of the joined column) has one
/// value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupTable {
    /// Its name in FROM / JOIN.
    pub name: &'static str,
    /// The key column (joined with the dataset's column in ON).
    pub key: &'static str,
    /// The value column (grouped by or filtered on).
    pub value: &'static str,
    /// `(value, keys)`: every key of each value, values in display order.
    pub rows: &'static [(&'static str, &'static [&'static str])],
}

impl LookupTable {
    /// The value of `key`, if the table has it.
    pub fn value_of(&self, key: &str) -> Option<&'static str> {
        self.rows
            .iter()
            .find(|(_, keys)| keys.contains(&key))
            .map(|(v, _)| *v)
    }

    /// The table as a [`Lookup`], the form the planner joins.
    pub fn to_lookup(&self) -> Lookup {
        Lookup {
            name: self.name.to_string(),
            key: self.key.to_string(),
            value: self.value.to_string(),
            rows: self
                .rows
                .iter()
                .map(|(v, keys)| (v.to_string(), keys.iter().map(|k| k.to_string()).collect()))
                .collect(),
        }
    }
}

/// Most keys a declared lookup table may have.
pub const MAX_LOOKUP_KEYS: usize = 10_000;

/// Most distinct values a declared lookup table may have: each is a
/// branch of the CASE its GROUP BY is planned as.
pub const MAX_LOOKUP_VALUES: usize = 64;

/// Longest key or value of a declared lookup table, in bytes.
pub const MAX_LOOKUP_TEXT: usize = 200;

/// A public lookup table as the planner joins it: a built-in one
/// ([`LookupTable::to_lookup`]) or one a dataset declares in `node.toml`
/// (`[[datasets.lookups]]`), published in `Describe` with the schema
/// ([`Lookup::to_proto`], [`Lookup::from_proto`]) so that the coordinator
/// plans the same join. Validated on construction ([`Lookup::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Its name in JOIN.
    pub name: String,
    /// The key column (joined with the dataset's column in ON).
    pub key: String,
    /// The value column (grouped by or filtered on).
    pub value: String,
    /// `(value, keys)`: every key of each value, values in display order.
    pub rows: Vec<(String, Vec<String>)>,
}

impl Lookup {
    /// A declared table: `name` (not a built-in table's), its `key` and
    /// `value` column names, and its `(key, value)` pairs in order (values
    /// shown in order of first appearance). Refused, saying what is wrong:
    /// a name that is not an identifier, the key and value named alike, no
    /// pairs or more than [`MAX_LOOKUP_KEYS`], a key listed twice, an empty
    /// or over-long key or value, the missing value (`-99`, `(missing)`)
    /// as either, more than [`MAX_LOOKUP_VALUES`] values.
    pub fn new(
        name: &str,
        key: &str,
        value: &str,
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Lookup, String> {
        let at = format!("lookup table {name:?}");
        for (what, n) in [("name", name), ("key", key), ("value", value)] {
            let ok = n.len() <= 64
                && n.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!(
                    "{at}: {what} {n:?} must be an identifier (letters, digits and _, not starting with a digit, at most 64)"
                ));
            }
        }
        if public_table(name).is_some() {
            return Err(format!(
                "{at}: {name} is a built-in table; choose another name"
            ));
        }
        if key.eq_ignore_ascii_case(value) {
            return Err(format!(
                "{at}: the key and value columns must have different names"
            ));
        }
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs {
            for (what, t) in [("key", &k), ("value", &v)] {
                if t.trim().is_empty()
                    || t.len() > MAX_LOOKUP_TEXT
                    || t.chars().any(char::is_control)
                    || t.trim() == "-99"
                    || t == crate::plan::MISSING_KEY
                {
                    return Err(format!(
                        "{at}: {what} {:?} must be non-empty text of at most {MAX_LOOKUP_TEXT} bytes without control characters, and not a missing value (-99, {})",
                        crate::schema::excerpt(t),
                        crate::plan::MISSING_KEY
                    ));
                }
            }
            if !seen.insert(k.clone()) {
                return Err(format!(
                    "{at}: key {k:?} is listed twice; each key has one value"
                ));
            }
            if seen.len() > MAX_LOOKUP_KEYS {
                return Err(format!("{at}: more than {MAX_LOOKUP_KEYS} keys"));
            }
            match rows.iter_mut().find(|(x, _)| *x == v) {
                Some((_, keys)) => keys.push(k),
                None => rows.push((v, vec![k])),
            }
        }
        if rows.is_empty() {
            return Err(format!("{at}: no rows; give at least one key = value"));
        }
        if rows.len() > MAX_LOOKUP_VALUES {
            return Err(format!(
                "{at}: {} distinct values, more than {MAX_LOOKUP_VALUES} (each is a GROUP BY key)",
                rows.len()
            ));
        }
        Ok(Lookup {
            name: name.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            rows,
        })
    }

    /// The value of `key`, if the table has it.
    pub fn value_of(&self, key: &str) -> Option<&str> {
        self.rows
            .iter()
            .find(|(_, keys)| keys.iter().any(|k| k == key))
            .map(|(v, _)| v.as_str())
    }

    /// The table as `Describe` publishes it.
    pub fn to_proto(&self) -> fedq_proto::v1::LookupTable {
        fedq_proto::v1::LookupTable {
            name: self.name.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
            rows: self
                .rows
                .iter()
                .map(|(value, keys)| fedq_proto::v1::LookupRow {
                    value: value.clone(),
                    keys: keys.clone(),
                })
                .collect(),
        }
    }

    /// A table as a node published it, validated as a declared one.
    pub fn from_proto(t: &fedq_proto::v1::LookupTable) -> Result<Lookup, String> {
        let pairs = t
            .rows
            .iter()
            .flat_map(|r| r.keys.iter().map(|k| (k.clone(), r.value.clone())));
        Lookup::new(&t.name, &t.key, &t.value, pairs)
    }
}

/// ISO 3166-1 alpha-2 country codes to the five regions of the UN
/// statistical standard M49 (Africa, Americas, Asia, Europe, Oceania).
///
/// Checked entry by entry on 2026-12-02 against the UN Statistics
/// Division's M49 overview (<https://unstats.un.org/unsd/methodology/m49/overview>,
/// its CSV as downloaded 2025-11-29 in the public `cbdq-io/datasets`
/// repository, `org/un/unstats/m49_overview_csv/m49_overview.csv`) and
/// cross-checked with `lukes/ISO-3166-Countries-with-Regional-Codes`
/// (`all/all.csv`, 2024-06-19): every one of the 247 areas M49 places in a
/// region is here with M49's region. Two codes differ from the list by
/// design: `AQ` (Antarctica), which M49 places in no region, is absent
/// (a LEFT JOIN gives it the missing region); `TW`, which M49 does not
/// list separately (UN statistics count it within China, 156, in Asia), is
/// Asia. Region by M49, not by continent: Mexico and the Caribbean are
/// Americas, Egypt and Sudan Africa, Turkey, Cyprus and the Caucasus
/// Asia, Russia Europe.
pub const REGIONS: LookupTable = LookupTable {
    name: "regions",
    key: "country",
    value: "region",
    rows: &[
        (
            "Africa",
            &[
                "DZ", "AO", "BJ", "BW", "BF", "BI", "CV", "CM", "CF", "TD", "KM", "CG", "CD", "CI",
                "DJ", "EG", "GQ", "ER", "SZ", "ET", "GA", "GM", "GH", "GN", "GW", "KE", "LS", "LR",
                "LY", "MG", "MW", "ML", "MR", "MU", "YT", "MA", "MZ", "NA", "NE", "NG", "RE", "RW",
                "SH", "ST", "SN", "SC", "SL", "SO", "ZA", "SS", "SD", "TZ", "TG", "TN", "UG", "EH",
                "ZM", "ZW", "IO", "TF",
            ],
        ),
        (
            "Americas",
            &[
                "AI", "AG", "AR", "AW", "BS", "BB", "BZ", "BM", "BO", "BQ", "BV", "BR", "CA", "KY",
                "CL", "CO", "CR", "CU", "CW", "DM", "DO", "EC", "SV", "FK", "GF", "GL", "GD", "GP",
                "GT", "GY", "HT", "HN", "JM", "MQ", "MX", "MS", "NI", "PA", "PY", "PE", "PR", "BL",
                "KN", "LC", "MF", "PM", "VC", "SX", "GS", "SR", "TT", "TC", "US", "UY", "VE", "VG",
                "VI",
            ],
        ),
        (
            "Asia",
            &[
                "AF", "AM", "AZ", "BH", "BD", "BT", "BN", "KH", "CN", "CY", "GE", "HK", "IN", "ID",
                "IR", "IQ", "IL", "JP", "JO", "KZ", "KW", "KG", "LA", "LB", "MO", "MY", "MV", "MN",
                "MM", "NP", "KP", "OM", "PK", "PS", "PH", "QA", "SA", "SG", "KR", "LK", "SY", "TW",
                "TJ", "TH", "TL", "TR", "TM", "AE", "UZ", "VN", "YE",
            ],
        ),
        (
            "Europe",
            &[
                "AX", "AL", "AD", "AT", "BY", "BE", "BA", "BG", "HR", "CZ", "DK", "EE", "FO", "FI",
                "FR", "DE", "GI", "GR", "GG", "VA", "HU", "IS", "IE", "IM", "IT", "JE", "LV", "LI",
                "LT", "LU", "MT", "MD", "MC", "ME", "NL", "MK", "NO", "PL", "PT", "RO", "RU", "SM",
                "RS", "SK", "SI", "ES", "SJ", "SE", "CH", "UA", "GB",
            ],
        ),
        (
            "Oceania",
            &[
                "AS", "AU", "CX", "CC", "CK", "FJ", "PF", "GU", "HM", "KI", "MH", "FM", "NR", "NC",
                "NZ", "NU", "NF", "MP", "PW", "PG", "PN", "WS", "SB", "TK", "TO", "TV", "UM", "VU",
                "WF",
            ],
        ),
    ],
};

/// Every public lookup table a query may join.
pub const PUBLIC_TABLES: &[LookupTable] = &[REGIONS];

/// The public table called `name` (case-insensitive), if any.
pub fn public_table(name: &str) -> Option<&'static LookupTable> {
    PUBLIC_TABLES
        .iter()
        .find(|t| t.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each key has one value: the table is a function.
    #[test]
    fn every_key_has_one_value() {
        for t in PUBLIC_TABLES {
            let mut keys: Vec<&str> = t.rows.iter().flat_map(|(_, k)| k.iter().copied()).collect();
            let n = keys.len();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), n, "{}: a key listed twice", t.name);
        }
        assert_eq!(REGIONS.value_of("PH"), Some("Asia"));
        assert_eq!(REGIONS.value_of("GB"), Some("Europe"));
        assert_eq!(REGIONS.value_of("XX"), None);
    }

    /// A declared table is validated, keeps its values in order of first
    /// appearance, and survives the round trip through `Describe`.
    #[test]
    fn declared_tables_are_validated_and_published_as_declared() {
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let t = Lookup::new(
            "zones",
            "country",
            "zone",
            pairs(&[("UA", "East"), ("PH", "Pacific"), ("MD", "East")]),
        )
        .unwrap();
        assert_eq!(
            t.rows,
            [
                ("East".to_string(), vec!["UA".to_string(), "MD".to_string()]),
                ("Pacific".to_string(), vec!["PH".to_string()])
            ]
        );
        assert_eq!(t.value_of("MD"), Some("East"));
        assert_eq!(Lookup::from_proto(&t.to_proto()).unwrap(), t);
        assert_eq!(REGIONS.to_lookup().value_of("MX"), Some("Americas"));
        for (name, key, value, p, says) in [
            (
                "regions",
                "country",
                "zone",
                pairs(&[("UA", "East")]),
                "built-in",
            ),
            (
                "zones",
                "country",
                "Country",
                pairs(&[("UA", "East")]),
                "different names",
            ),
            (
                "zo nes",
                "country",
                "zone",
                pairs(&[("UA", "East")]),
                "identifier",
            ),
            ("zones", "country", "zone", pairs(&[]), "no rows"),
            (
                "zones",
                "country",
                "zone",
                pairs(&[("UA", "E"), ("UA", "W")]),
                "listed twice",
            ),
            (
                "zones",
                "country",
                "zone",
                pairs(&[("UA", "-99")]),
                "missing value",
            ),
            ("zones", "country", "zone", pairs(&[("", "E")]), "non-empty"),
            (
                "zones",
                "country",
                "zone",
                pairs(&[("UA", "(missing)")]),
                "missing value",
            ),
        ] {
            let e = Lookup::new(name, key, value, p).unwrap_err();
            assert!(e.contains(says), "{name} {key} {value}: {e}");
        }
        let many: Vec<(String, String)> = (0..65)
            .map(|i| (format!("K{i}"), format!("V{i}")))
            .collect();
        assert!(Lookup::new("zones", "k", "v", many)
            .unwrap_err()
            .contains("more than 64"));
    }

    /// Areas whose M49 region is often guessed wrong (by continent, by
    /// politics), as the UN M49 overview places them.
    #[test]
    fn regions_follow_m49_where_it_is_easy_to_guess_wrong() {
        let spot = [
            ("MX", "Americas"),
            ("GL", "Americas"),
            ("BM", "Americas"),
            ("FK", "Americas"),
            ("GS", "Americas"),
            ("BV", "Americas"),
            ("EG", "Africa"),
            ("SD", "Africa"),
            ("EH", "Africa"),
            ("IO", "Africa"),
            ("TF", "Africa"),
            ("RE", "Africa"),
            ("TR", "Asia"),
            ("CY", "Asia"),
            ("GE", "Asia"),
            ("AM", "Asia"),
            ("AZ", "Asia"),
            ("KZ", "Asia"),
            ("IL", "Asia"),
            ("PS", "Asia"),
            ("TL", "Asia"),
            ("RU", "Europe"),
            ("SJ", "Europe"),
            ("AX", "Europe"),
            ("GI", "Europe"),
            ("VA", "Europe"),
            ("HM", "Oceania"),
            ("UM", "Oceania"),
            ("CX", "Oceania"),
            ("CC", "Oceania"),
            ("PG", "Oceania"),
        ];
        for (country, region) in spot {
            assert_eq!(REGIONS.value_of(country), Some(region), "{country}");
        }
        // M49 places Antarctica in no region.
        assert_eq!(REGIONS.value_of("AQ"), None);
        // The 247 areas M49 places in a region, and TW.
        let n: usize = REGIONS.rows.iter().map(|(_, k)| k.len()).sum();
        assert_eq!(n, 248);
    }
}
