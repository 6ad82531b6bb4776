//! Public lookup tables: small tables every node and coordinator hold the
//! same copy of, compiled into the planner, that a query may JOIN to its
//! dataset by key (country to region). They are public metadata, like a
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
}

/// ISO 3166-1 alpha-2 country codes to the five regions of the UN
/// statistical standard M49 (Africa, Americas, Asia, Europe, Oceania).
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
}
