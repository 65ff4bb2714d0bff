//! A Dockerfile read into stages and instructions, enough for `tests/tests/deploy.rs` to check
//! that what `deploy/docker/Dockerfile` runs and copies exists in the project (there is no Docker
//! engine to build it here). Handles comments, `\` continuations, `FROM … AS name`, shell and
//! JSON (exec) forms; not heredocs, `ARG` substitution or `ONBUILD`, which the file does not use.

use std::path::{Path, PathBuf};

/// Why a Dockerfile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DockerfileError {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
}

/// One instruction: its keyword in upper case and the rest of the (joined) line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub keyword: String,
    pub arguments: String,
    /// First line of the instruction, 1-based, for messages.
    pub line: usize,
}

/// A `FROM` and the instructions up to the next one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub base: String,
    /// The name after `AS`, if any.
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
}

/// A `COPY`: sources, destination, and the stage it copies from (`--from=`), if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyInstruction {
    pub from: Option<String>,
    pub sources: Vec<String>,
    pub destination: String,
    pub line: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dockerfile {
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        Self::parse(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, DockerfileError> {
        let mut stages: Vec<Stage> = Vec::new();
        for instruction in instructions(text) {
            if instruction.keyword == "FROM" {
                stages.push(from(&instruction)?);
                continue;
            }
            match stages.last_mut() {
                Some(stage) => stage.instructions.push(instruction),
                // Only ARG may precede the first FROM.
                None if instruction.keyword == "ARG" => {}
                None => {
                    return Err(DockerfileError::Syntax {
                        line: instruction.line,
                        message: format!("{} before the first FROM", instruction.keyword),
                    });
                }
            }
        }
        Ok(Self { stages })
    }

    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages
            .iter()
            .find(|stage| stage.name.as_deref() == Some(name))
    }

    /// The last stage: the image the file builds.
    pub fn image(&self) -> Option<&Stage> {
        self.stages.last()
    }
}

impl Stage {
    /// The instructions with `keyword`, in order.
    pub fn all<'s>(&'s self, keyword: &'s str) -> impl Iterator<Item = &'s Instruction> + 's {
        self.instructions
            .iter()
            .filter(move |instruction| instruction.keyword == keyword)
    }

    /// The last `WORKDIR` (absolute paths only), `/` without one.
    pub fn workdir(&self) -> PathBuf {
        self.all("WORKDIR")
            .last()
            .map_or_else(|| PathBuf::from("/"), |w| PathBuf::from(w.arguments.trim()))
    }

    /// Each shell command of each `RUN`, split at `&&` and `;`, as words.
    pub fn run_commands(&self) -> Vec<Vec<String>> {
        self.all("RUN")
            .flat_map(|run| {
                run.arguments
                    .split("&&")
                    .flat_map(|part| part.split(';'))
                    .map(|command| command.split_whitespace().map(str::to_owned).collect())
                    .filter(|words: &Vec<String>| !words.is_empty())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn copies(&self) -> Result<Vec<CopyInstruction>, DockerfileError> {
        self.all("COPY").map(copy).collect()
    }

    /// `ENTRYPOINT` or `CMD` (the last one), which must be in exec (JSON) form.
    pub fn exec_form(&self, keyword: &str) -> Result<Option<Vec<String>>, DockerfileError> {
        let Some(instruction) = self.all(keyword).last() else {
            return Ok(None);
        };
        serde_json::from_str(&instruction.arguments)
            .map(Some)
            .map_err(|error| DockerfileError::Syntax {
                line: instruction.line,
                message: format!("{keyword} is not a JSON list of strings: {error}"),
            })
    }
}

/// The instructions of `text`: comments and blank lines dropped, continuations joined.
fn instructions(text: &str) -> Vec<Instruction> {
    let mut result = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        // A comment line inside a continued instruction is dropped too, as Docker does.
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (trimmed, false),
        };
        let (start, mut joined) = pending.take().unwrap_or((index + 1, String::new()));
        if !joined.is_empty() {
            joined.push(' ');
        }
        joined.push_str(body);
        if continues {
            pending = Some((start, joined));
        } else {
            result.extend(instruction(start, &joined));
        }
    }
    if let Some((start, joined)) = pending {
        result.extend(instruction(start, &joined));
    }
    result
}

fn instruction(line: usize, text: &str) -> Option<Instruction> {
    let (keyword, arguments) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    (!keyword.is_empty()).then(|| Instruction {
        keyword: keyword.to_ascii_uppercase(),
        arguments: arguments.trim().to_owned(),
        line,
    })
}

fn from(instruction: &Instruction) -> Result<Stage, DockerfileError> {
    let words: Vec<&str> = instruction
        .arguments
        .split_whitespace()
        .filter(|word| !word.starts_with("--"))
        .collect();
    let (base, name) = match words.as_slice() {
        [base] => (*base, None),
        [base, r#as, name] if r#as.eq_ignore_ascii_case("as") => (*base, Some(*name)),
        _ => {
            return Err(DockerfileError::Syntax {
                line: instruction.line,
                message: format!("FROM {}: expected `IMAGE [AS NAME]`", instruction.arguments),
            });
        }
    };
    Ok(Stage {
        base: base.to_owned(),
        name: name.map(str::to_owned),
        instructions: Vec::new(),
    })
}

fn copy(instruction: &Instruction) -> Result<CopyInstruction, DockerfileError> {
    let mut from = None;
    let mut rest = instruction.arguments.as_str();
    while let Some(flag) = rest.strip_prefix("--") {
        let (flag, after) = flag.split_once(char::is_whitespace).unwrap_or((flag, ""));
        if let Some(stage) = flag.strip_prefix("from=") {
            from = Some(stage.to_owned());
        }
        rest = after.trim_start();
    }
    let mut paths: Vec<String> = if rest.starts_with('[') {
        serde_json::from_str(rest).map_err(|error| DockerfileError::Syntax {
            line: instruction.line,
            message: format!("COPY {rest}: not a JSON list of strings: {error}"),
        })?
    } else {
        rest.split_whitespace().map(str::to_owned).collect()
    };
    let Some(destination) = paths.pop().filter(|_| !paths.is_empty()) else {
        return Err(DockerfileError::Syntax {
            line: instruction.line,
            message: format!("COPY {}: expected sources and a destination", rest),
        });
    };
    Ok(CopyInstruction {
        from,
        sources: paths,
        destination,
        line: instruction.line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# syntax=docker/dockerfile:1\n\
        FROM rust:1 AS build\n\
        WORKDIR /src\n\
        COPY . .\n\
        RUN apt-get update \\\n    && apt-get install -y gcc ; cargo build --release -p app\n\
        FROM debian:bookworm-slim\n\
        # a comment\n\
        COPY --from=build --chmod=755 /src/target/release/app /usr/bin/app\n\
        COPY [\"a b\", \"/c/\"]\n\
        ENTRYPOINT [\"/usr/bin/app\"]\n\
        CMD run\n";

    #[test]
    fn stages_instructions_and_continuations() {
        let file = Dockerfile::parse(FILE).expect("parses");
        assert_eq!(file.stages.len(), 2);
        let build = file.stage("build").expect("build stage");
        assert_eq!(build.base, "rust:1");
        assert_eq!(build.workdir(), PathBuf::from("/src"));
        assert_eq!(
            build.run_commands(),
            [
                vec!["apt-get", "update"],
                vec!["apt-get", "install", "-y", "gcc"],
                vec!["cargo", "build", "--release", "-p", "app"],
            ]
        );
        assert_eq!(build.all("RUN").next().map(|run| run.line), Some(5));
        let image = file.image().expect("an image");
        assert_eq!(image.name, None);
        assert_eq!(image.workdir(), PathBuf::from("/"));
    }

    #[test]
    fn copies_with_flags_and_json_form() {
        let file = Dockerfile::parse(FILE).expect("parses");
        let copies = file.image().expect("an image").copies().expect("copies");
        assert_eq!(copies[0].from.as_deref(), Some("build"));
        assert_eq!(copies[0].sources, ["/src/target/release/app"]);
        assert_eq!(copies[0].destination, "/usr/bin/app");
        assert_eq!(copies[1].from, None);
        assert_eq!(copies[1].sources, ["a b"]);
        assert_eq!(copies[1].destination, "/c/");
    }

    #[test]
    fn exec_forms_must_be_json() {
        let file = Dockerfile::parse(FILE).expect("parses");
        let image = file.image().expect("an image");
        assert_eq!(
            image.exec_form("ENTRYPOINT").expect("json"),
            Some(vec!["/usr/bin/app".to_owned()])
        );
        assert!(image.exec_form("CMD").is_err());
    }

    #[test]
    fn malformed_files_are_errors_with_the_line() {
        let error = Dockerfile::parse("RUN true\n").expect_err("RUN before FROM");
        assert_eq!(error.to_string(), "line 1: RUN before the first FROM");
        let error = Dockerfile::parse("FROM a b\n").expect_err("bad FROM");
        assert!(error.to_string().starts_with("line 1: FROM a b"), "{error}");
        let file = Dockerfile::parse("FROM a\nCOPY x\n").expect("parses");
        let error = file
            .image()
            .expect("a stage")
            .copies()
            .expect_err("COPY without a destination");
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
