//! Interactive SVG flame graphs, drawn by inferno from the folded stacks.

use std::io::{self, Write};

use inferno::flamegraph::color::{MultiPalette, Palette};
use inferno::flamegraph::{Options, from_lines};
use quick_xml::escape::escape;

use super::folded::folded_stacks;
use super::{Profile, ProfileExporter, Weight};

/// Writes a flame graph of the stacks [`Folded`](super::Folded) would write, with the profile's
/// notes as subtitle.
///
/// A profile with nothing to draw (no samples, or all rounded to 0) still gives a valid SVG,
/// one that says "No samples": a run that sampled nothing is an answer, not an error, and
/// whatever opens the file expects an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlameGraphSvg {
    pub weight: Weight,
    pub title: String,
}

impl ProfileExporter for FlameGraphSvg {
    fn export(&self, profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
        let stacks = folded_stacks(profile, &self.weight)?;
        let subtitle = (!profile.notes.is_empty()).then(|| profile.notes.join("; "));
        // inferno fails (after writing an error image) when the counts sum to 0.
        if stacks.iter().all(|&(_, count)| count == 0) {
            return write_no_samples(&self.title, subtitle.as_deref(), out);
        }
        let lines: Vec<String> = stacks
            .iter()
            .map(|(stack, count)| format!("{stack} {count}"))
            .collect();
        let mut options = Options::default();
        options.title.clone_from(&self.title);
        options.subtitle = subtitle;
        options.count_name.clone_from(&self.weight.unit_label);
        // The classic reds (yellow for `::` names), with kernel frames (`_[k]`) in orange; only
        // names containing `Perl` or `.pl` get this palette's green.
        options.colors = Palette::Multi(MultiPalette::Perl);
        // Colour by name rather than at random: the same function looks the same in every file.
        options.hash = true;
        from_lines(&mut options, lines.iter().map(String::as_str), out)
    }
}

/// A small SVG with the title, the subtitle and "No samples", centred.
fn write_no_samples(title: &str, subtitle: Option<&str>, out: &mut dyn Write) -> io::Result<()> {
    let texts: Vec<&str> = [Some(title), subtitle, Some("No samples")]
        .into_iter()
        .flatten()
        .collect();
    let height = 24 * (texts.len() + 1);
    writeln!(
        out,
        r#"<?xml version="1.0" standalone="no"?>
<svg version="1.1" width="1200" height="{height}" viewBox="0 0 1200 {height}" xmlns="http://www.w3.org/2000/svg">"#
    )?;
    for (index, text) in texts.into_iter().enumerate() {
        writeln!(
            out,
            r#"<text x="600" y="{}" text-anchor="middle" font-family="Verdana" font-size="17">{}</text>"#,
            24 * (index + 1),
            escape(text)
        )?;
    }
    writeln!(out, "</svg>")
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use quick_xml::Reader;
    use quick_xml::escape::resolve_predefined_entity;
    use quick_xml::events::Event;

    use super::*;
    use crate::profile::ValueType;
    use crate::profile::test_support::sample_profile;

    fn svg(profile: &Profile, title: &str) -> String {
        let exporter = FlameGraphSvg {
            weight: Weight {
                value_index: 0,
                divisor: 1,
                unit_label: "samples".to_owned(),
            },
            title: title.to_owned(),
        };
        let mut out = Vec::new();
        exporter
            .export(profile, &mut out)
            .expect("export to memory");
        String::from_utf8(out).expect("SVG is UTF-8")
    }

    /// Parses `svg` as XML and returns its text content (one line per element), failing on
    /// malformed XML.
    fn text_of(svg: &str) -> String {
        let mut reader = Reader::from_str(svg);
        reader.config_mut().check_end_names = true;
        let mut text = String::new();
        let mut depth = 0_i32;
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(_) => depth += 1,
                Event::End(_) => {
                    depth -= 1;
                    text.push('\n');
                }
                Event::Text(content) => text.push_str(&content.decode().expect("UTF-8")),
                Event::GeneralRef(reference) => match reference.resolve_char_ref() {
                    Ok(Some(c)) => text.push(c),
                    _ => {
                        let name = reference.decode().expect("UTF-8");
                        text.push_str(resolve_predefined_entity(&name).expect("known entity"));
                    }
                },
                Event::Eof => break,
                _ => {}
            }
        }
        assert_eq!(depth, 0, "every element is closed");
        text
    }

    #[test]
    fn svg_is_well_formed_and_names_frames() {
        let svg = svg(&sample_profile(), "CPU & <co>");
        let text = text_of(&svg);
        for name in [
            "CPU & <co>",
            "sampled at 1 kHz",
            "app",
            "db",
            "query",
            "do_syscall_64",
            "<[u8: 4]>::len",
            "[unknown] (/usr/bin/app+0x2a)",
        ] {
            assert!(text.contains(name), "{name} in the SVG text");
        }
    }

    #[test]
    fn svg_colours_kernel_frames_orange() {
        let svg = svg(&sample_profile(), "CPU");
        // The fill of a frame's rectangle follows its `<title>`; orange is the only colour of
        // the palette without blue.
        let fill = |function: &str| {
            let frame = &svg[svg.find(&format!("<title>{function} (")).expect("frame")..];
            let fill = &frame[frame.find("fill=\"rgb(").expect("fill") + 10..];
            fill[..fill.find(')').expect("rgb(...)")].to_owned()
        };
        assert!(
            fill("do_syscall_64").ends_with(",0"),
            "kernel frame is orange"
        );
        assert!(!fill("query").ends_with(",0"), "user frame is not orange");
    }

    #[test]
    fn svg_empty_profile_says_no_samples() {
        let profile = Profile::new(vec![ValueType::new("samples", "count")], SystemTime::now());
        let svg = svg(&profile, "CPU & <co>");
        assert!(svg.starts_with("<?xml"));
        let text = text_of(&svg);
        assert!(text.contains("CPU & <co>"));
        assert!(text.contains("No samples"));
    }
}
