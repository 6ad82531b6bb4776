//! A partner's own coding of the synthetic CTDC data, for the demo and the
//! tests of mappings: the same records as [`crate::synth`] writes, exported
//! the way a partner's case system might, together with the
//! `[datasets.mapping]` that reads them back as the standard's.
//!
//! [`recode`] rewrites a standard-coded CSV:
//!
//! | standard column | partner's column | partner's values |
//! |---|---|---|
//! | `gender` | `sex` | `F`, `M`, `T`; missing as empty or `unknown` |
//! | `ageBroad` | `age` | whole years inside the band |
//! | `citizenship` | `nationality` | English country names (ISO 3166-1) |
//! | `CountryOfExploitation` | `country_of_exploitation` | English country names |
//! | `isForcedLabour` | `forced_labour` | `yes` / `no` |
//! | `isSexualExploit` | `sexual_exploitation` | `yes` / `no` |
//!
//! Every other column is copied. Read through [`MAPPING_TOML`], the result
//! codes every record exactly as the original does (the `unknown` genders
//! are unmapped, so counted and stored as missing, as the original's `-99`).
//! Not on the privacy path; deterministic.

use std::io::{Read, Write};

use crate::mapping::countries::COUNTRIES;

/// The `[datasets.mapping]` for a file written by [`recode`], for a
/// dataset following the shipped CTDC standard.
pub const MAPPING_TOML: &str = r#"[datasets.mapping.gender]
from = "sex"
values = { F = "Female", M = "Male", T = "Trans/Transgender/NonConforming" }

[datasets.mapping.ageBroad]
from = "age"
convert = "age_to_band"

[datasets.mapping.citizenship]
from = "nationality"
convert = "country_to_iso2"

[datasets.mapping.CountryOfExploitation]
from = "country_of_exploitation"
convert = "country_to_iso2"

[datasets.mapping.isForcedLabour]
from = "forced_labour"
values = { yes = "1", no = "0" }
unmapped = "error"

[datasets.mapping.isSexualExploit]
from = "sexual_exploitation"
values = { yes = "1", no = "0" }
unmapped = "error"
"#;

/// The partner's header for a standard column, and how its values are
/// rewritten.
fn rename(column: &str) -> &str {
    match column {
        "gender" => "sex",
        "ageBroad" => "age",
        "citizenship" => "nationality",
        "CountryOfExploitation" => "country_of_exploitation",
        "isForcedLabour" => "forced_labour",
        "isSexualExploit" => "sexual_exploitation",
        other => other,
    }
}

/// A country's first English name in the ISO table, or the code itself.
fn country_name(code: &str) -> String {
    COUNTRIES
        .iter()
        .find(|c| c.0 == code)
        .map(|c| c.2[0].to_string())
        .unwrap_or_else(|| code.to_string())
}

/// A whole age inside `band` (`a--b` or `a+`), chosen from `row`.
fn age_in(band: &str, row: usize) -> String {
    if let Some(lo) = band.strip_suffix('+').and_then(|a| a.parse::<usize>().ok()) {
        return (lo + row % 30).to_string();
    }
    match band
        .split_once("--")
        .map(|(a, b)| (a.parse::<usize>(), b.parse::<usize>()))
    {
        Some((Ok(lo), Ok(hi))) if lo <= hi => (lo + row % (hi - lo + 1)).to_string(),
        _ => band.to_string(),
    }
}

/// Rewrites the standard-coded CSV `input` in the partner's coding (see
/// the module doc) to `out`.
pub fn recode(input: impl Read, out: impl Write) -> Result<(), csv::Error> {
    let mut rdr = csv::Reader::from_reader(input);
    let headers = rdr.headers()?.clone();
    let mut w = csv::Writer::from_writer(out);
    w.write_record(headers.iter().map(rename))?;
    let mut missing_genders = 0usize;
    for (row, rec) in rdr.records().enumerate() {
        let rec = rec?;
        let cells: Vec<String> = headers
            .iter()
            .zip(rec.iter())
            .map(|(h, v)| {
                let missing = v == "-99" || v.is_empty();
                match h {
                    "gender" if missing => {
                        missing_genders += 1;
                        if missing_genders.is_multiple_of(3) {
                            "unknown"
                        } else {
                            ""
                        }
                        .to_string()
                    }
                    "gender" => v.chars().next().map(String::from).unwrap_or_default(),
                    _ if missing => v.to_string(),
                    "ageBroad" => age_in(v, row),
                    "citizenship" | "CountryOfExploitation" => country_name(v),
                    "isForcedLabour" | "isSexualExploit" => {
                        if v == "1" { "yes" } else { "no" }.to_string()
                    }
                    _ => v.to_string(),
                }
            })
            .collect();
        w.write_record(&cells)?;
    }
    w.flush()?;
    Ok(())
}

/// [`MAPPING_TOML`], parsed.
pub fn mapping() -> crate::mapping::Mapping {
    #[derive(serde::Deserialize)]
    struct File {
        datasets: Datasets,
    }
    #[derive(serde::Deserialize)]
    struct Datasets {
        mapping: crate::mapping::Mapping,
    }
    toml::from_str::<File>(MAPPING_TOML)
        .expect("the shipped mapping parses")
        .datasets
        .mapping
}

/// Loads a file written by [`recode`] into a new table `<namespace>.cases`
/// (the schema is created), as a partner's own database might hold it:
/// every column as text, except ages (`age`) and the standard's numbers,
/// which are `integer`. Returns `"<namespace>.cases"`. For tests and
/// benchmarks of database sources read through [`MAPPING_TOML`];
/// `namespace` must be a plain identifier.
pub async fn load_into_postgres(
    client: &tokio_postgres::Client,
    namespace: &str,
    partner_csv: &[u8],
) -> Result<String, tokio_postgres::Error> {
    use fedq_plan::schema::{Column, Schema};
    use tokio_postgres::types::ToSql;
    let schema = Schema::from_specs("cases", &crate::synth::ctdc_columns())
        .expect("the synthetic schema is valid");
    let mut reader = csv::Reader::from_reader(partner_csv);
    let headers: Vec<String> = match reader.headers() {
        Ok(h) => h.iter().map(String::from).collect(),
        Err(_) => Vec::new(),
    };
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::new(); headers.len()];
    for r in reader.records().map_while(Result::ok) {
        for (k, v) in r.iter().enumerate() {
            columns[k].push((!v.is_empty()).then(|| v.to_string()));
        }
    }
    let quote = crate::postgres::statement::quote;
    let table = format!("{namespace}.cases");
    let defs: Vec<String> = headers
        .iter()
        .map(|h| {
            let numeric = h == "age"
                || schema.index_of(h).is_some_and(|i| {
                    matches!(
                        schema.columns[i],
                        Column::Integer { .. } | Column::Boolean { .. }
                    )
                });
            format!("{} {}", quote(h), if numeric { "integer" } else { "text" })
        })
        .collect();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {namespace}; CREATE TABLE {table} ({})",
            defs.join(", ")
        ))
        .await?;
    // Text in, cast per column (an empty cell is NULL).
    let casts: Vec<String> = defs
        .iter()
        .enumerate()
        .map(|(k, d)| {
            if d.ends_with(" integer") {
                format!("${}::text[]::integer[]", k + 1)
            } else {
                format!("${}::text[]", k + 1)
            }
        })
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    client
        .execute(
            &format!(
                "INSERT INTO {table} SELECT * FROM unnest({})",
                casts.join(", ")
            ),
            &params,
        )
        .await?;
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Mapped, Mapper, Mapping};
    use fedq_plan::standard::Standard;

    /// Read back through the mapping, the partner's file codes every cell
    /// exactly as the standard-coded original.
    #[test]
    fn the_recoded_file_maps_back_to_the_same_codes() {
        let standard = Standard::parse(include_str!(
            "../../../deploy/standards/ctdc-cases-1.0.toml"
        ))
        .unwrap();
        let schema = &standard.dataset("cases").unwrap().schema;
        #[derive(serde::Deserialize)]
        struct Wrapper {
            datasets: Inner,
        }
        #[derive(serde::Deserialize)]
        struct Inner {
            mapping: Mapping,
        }
        let mapping = toml::from_str::<Wrapper>(MAPPING_TOML)
            .unwrap()
            .datasets
            .mapping;
        let mapper = Mapper::compile("cases", schema, &mapping).unwrap();
        let mut original = Vec::new();
        crate::synth::write_csv(
            crate::synth::Partner::CaseManagement,
            3000,
            5,
            &mut original,
        )
        .unwrap();
        let mut local = Vec::new();
        recode(original.as_slice(), &mut local).unwrap();
        let mut a = csv::Reader::from_reader(original.as_slice());
        let mut b = csv::Reader::from_reader(local.as_slice());
        let ha = a.headers().unwrap().clone();
        let hb = b.headers().unwrap().clone();
        let mut unmapped = 0;
        for (ra, rb) in a.records().zip(b.records()) {
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            for (i, col) in schema.columns.iter().enumerate() {
                let pa = ha.iter().position(|h| h == col.name()).unwrap();
                let pb = hb.iter().position(|h| h == mapper.source(i)).unwrap();
                let want = col.encode(&ra[pa]).unwrap();
                let got = match mapper.map(i, col, &rb[pb]) {
                    None => col.encode(&rb[pb]).unwrap(),
                    Some(Mapped::Code(c)) => c,
                    Some(Mapped::Unmapped(_)) => {
                        unmapped += 1;
                        fedq_plan::schema::MISSING
                    }
                };
                assert_eq!(got, want, "{} {:?} -> {:?}", col.name(), &ra[pa], &rb[pb]);
            }
        }
        assert!(unmapped > 0, "some genders are written \"unknown\"");
        let text = String::from_utf8(local).unwrap();
        assert!(text.lines().next().unwrap().contains("sex,age,"));
        assert!(text.contains("Viet Nam") || text.contains("Philippines"));
    }
}
