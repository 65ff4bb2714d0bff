//! Go templates in host-rule names, with the context Rover 0.5.0's scanner gives them:
//!
//! - `.Process`: `Pid`, `ExeName`, `ExeFilePath`, `CommandLine`, `ExeNameInCommandLine` (argv[0]),
//!   `WorkDir`;
//! - `.Rover`: `InstanceID`, `HostName`, `HostIPV4 "iface"`, `HostIPV6 "iface"`;
//! - `.Finder`: `Layer`, `RegexMatchGroup N` (group N of `match_cmd`, 0 the whole match);
//! - the function `equalsOrDefault EQ IF_SAME VALUE` (IF_SAME when VALUE equals EQ, else VALUE).
//!
//! gtmpl calls a function-valued field with its receiver only and refuses arguments, so a method
//! with arguments (`{{.Rover.HostIPV4 "en0"}}`) cannot be a field. Before parsing, the template
//! text is rewritten so that each such method becomes a template function taking its receiver
//! first: `.Rover.HostIPV4 "en0"` → `__roverHostIPV4 $.Rover "en0"` (in actions only, never in
//! string literals or comments); it reads its data from the receiver object. Methods without
//! arguments are plain values, or functions of their receiver when they read `/proc` lazily.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use gtmpl::{Context, Func, FuncError, Value};

use super::host_ip::InterfaceIps;

/// Methods with arguments and the functions they become (see the module doc).
const METHODS_WITH_ARGUMENTS: &[(&str, &str)] = &[
    (".Rover.HostIPV4", "__roverHostIPV4 $.Rover"),
    (".Rover.HostIPV6", "__roverHostIPV6 $.Rover"),
    (
        ".Finder.RegexMatchGroup",
        "__finderRegexMatchGroup $.Finder",
    ),
];

const FUNCTIONS: &[(&str, Func)] = &[
    ("__roverHostIPV4", rover_host_ipv4),
    ("__roverHostIPV6", rover_host_ipv6),
    ("__finderRegexMatchGroup", finder_regex_match_group),
    ("equalsOrDefault", equals_or_default),
];

// Fields the context objects carry for the functions above; not part of the documented context.
const PROC_DIR: &str = "__procDir";
const INTERFACES: &str = "__interfaces";
const HOST_IP: &str = "__hostIP";
const GROUPS: &str = "__groups";

/// One parsed name template.
pub(crate) struct RuleTemplate {
    template: gtmpl::Template,
    /// Whether it asks for interface addresses, so a scan lists interfaces only when needed.
    pub(crate) uses_interfaces: bool,
}

impl RuleTemplate {
    /// gtmpl's errors are large: boxed, to keep results small.
    pub(crate) fn parse(source: &str) -> Result<Self, Box<gtmpl::error::ParseError>> {
        let (text, uses_interfaces) = rewrite_methods_with_arguments(source);
        let mut template = gtmpl::Template::default();
        template.add_funcs(FUNCTIONS);
        template.parse(text).map_err(Box::new)?;
        Ok(Self {
            template,
            uses_interfaces,
        })
    }

    pub(crate) fn render(&self, context: &Context) -> Result<String, Box<gtmpl::error::ExecError>> {
        self.template.render(context).map_err(Box::new)
    }
}

/// What `.Process` shows of one process.
pub(crate) struct ProcessValues<'a> {
    pub(crate) pid: u32,
    pub(crate) exe_name: &'a str,
    pub(crate) argv: &'a [String],
    pub(crate) command_line: &'a str,
    /// `/proc/PID`, read when a template asks for `ExeFilePath` or `WorkDir`.
    pub(crate) proc_dir: &'a Path,
}

/// What `.Rover` shows: the agent and its host.
pub(crate) struct RoverValues<'a> {
    pub(crate) instance_id: &'a str,
    pub(crate) host_name: &'a str,
    pub(crate) host_ip: IpAddr,
    /// This scan's interfaces; `None` when no template asks for them.
    pub(crate) interfaces: Option<&'a HashMap<String, InterfaceIps>>,
}

/// What `.Finder` shows: the rule that matched.
pub(crate) struct FinderValues<'a> {
    pub(crate) layer: &'a str,
    /// `match_cmd`'s groups against the command line; an unmatched group is empty.
    pub(crate) groups: &'a [String],
}

/// The template context for one process.
pub(crate) fn context(
    process: &ProcessValues<'_>,
    rover: &RoverValues<'_>,
    finder: &FinderValues<'_>,
) -> Context {
    let process = object([
        ("Pid", Value::from(process.pid)),
        ("ExeName", Value::from(process.exe_name)),
        ("CommandLine", Value::from(process.command_line)),
        (
            "ExeNameInCommandLine",
            process.argv.first().map_or(Value::Nil, Value::from),
        ),
        ("ExeFilePath", Value::from(process_exe_file_path as Func)),
        ("WorkDir", Value::from(process_work_dir as Func)),
        (PROC_DIR, Value::from(process.proc_dir.to_string_lossy())),
    ]);
    let interfaces: HashMap<String, Value> = rover
        .interfaces
        .into_iter()
        .flatten()
        .map(|(name, ips)| {
            let ips = object([
                ("v4", ips.v4.map(|ip| ip.to_string()).into()),
                ("v6", ips.v6.map(|ip| ip.to_string()).into()),
            ]);
            (name.clone(), ips)
        })
        .collect();
    let rover = object([
        ("InstanceID", Value::from(rover.instance_id)),
        ("HostName", Value::from(rover.host_name)),
        (HOST_IP, Value::from(rover.host_ip.to_string())),
        (INTERFACES, Value::Map(interfaces)),
    ]);
    let finder = object([
        ("Layer", Value::from(finder.layer)),
        (GROUPS, Value::from(finder.groups)),
    ]);
    Context::from(object([
        ("Process", process),
        ("Rover", rover),
        ("Finder", finder),
    ]))
}

fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

/// Rewrites each method with arguments into its function (see the module doc); also says whether
/// an interface method was used.
fn rewrite_methods_with_arguments(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut uses_interfaces = false;
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start + 2]);
        rest = &rest[start + 2..];
        let mut previous: Option<char> = None;
        loop {
            if rest.is_empty() || rest.starts_with("}}") {
                break;
            }
            // Literals and comments are copied whole.
            let literal_end = match rest.as_bytes()[0] {
                b'"' => Some(quoted_end(rest, '"')),
                b'\'' => Some(quoted_end(rest, '\'')),
                b'`' => Some(rest[1..].find('`').map_or(rest.len(), |end| end + 2)),
                b'/' if rest.starts_with("/*") => {
                    Some(rest[2..].find("*/").map_or(rest.len(), |end| end + 4))
                }
                _ => None,
            };
            if let Some(end) = literal_end {
                out.push_str(&rest[..end]);
                rest = &rest[end..];
                previous = Some('"');
                continue;
            }
            let at_boundary = previous
                .is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '_' | '.' | ')' | '$')));
            if at_boundary {
                let method = rest.strip_prefix('$').unwrap_or(rest);
                let rewrite = METHODS_WITH_ARGUMENTS.iter().find(|(name, _)| {
                    method.strip_prefix(name).is_some_and(|after| {
                        after
                            .chars()
                            .next()
                            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'))
                    })
                });
                if let Some((name, function)) = rewrite {
                    uses_interfaces |= name.starts_with(".Rover.");
                    out.push_str(function);
                    rest = &method[name.len()..];
                    previous = Some(' ');
                    continue;
                }
            }
            let Some(c) = rest.chars().next() else { break };
            out.push(c);
            rest = &rest[c.len_utf8()..];
            previous = Some(c);
        }
    }
    out.push_str(rest);
    (out, uses_interfaces)
}

/// The length of a `"…"` or `'…'` literal at the start of `text`, with backslash escapes.
fn quoted_end(text: &str, quote: char) -> usize {
    let mut escaped = false;
    for (index, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            _ if c == quote => return index + 1,
            _ => {}
        }
    }
    text.len()
}

fn field<'a>(receiver: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    match receiver? {
        Value::Object(fields) | Value::Map(fields) => fields.get(name),
        _ => None,
    }
}

fn string_argument<'a>(
    args: &'a [Value],
    index: usize,
    function: &str,
) -> Result<&'a str, FuncError> {
    match args.get(index) {
        Some(Value::String(text)) => Ok(text),
        _ => Err(FuncError::ExactlyXArgs(function.to_owned(), index)),
    }
}

fn read_link_in_proc_dir(args: &[Value], link: &str) -> Result<Value, FuncError> {
    let Some(Value::String(proc_dir)) = field(args.first(), PROC_DIR) else {
        return Err(FuncError::Generic("not a process".to_owned()));
    };
    let path = Path::new(proc_dir).join(link);
    std::fs::read_link(&path)
        .map(|target| Value::from(target.to_string_lossy()))
        .map_err(|error| FuncError::Generic(format!("cannot read {}: {error}", path.display())))
}

/// `.Process.ExeFilePath`: the executable's path (`/proc/PID/exe`).
fn process_exe_file_path(args: &[Value]) -> Result<Value, FuncError> {
    read_link_in_proc_dir(args, "exe")
}

/// `.Process.WorkDir`: the working directory (`/proc/PID/cwd`).
fn process_work_dir(args: &[Value]) -> Result<Value, FuncError> {
    read_link_in_proc_dir(args, "cwd")
}

/// `.Rover.HostIPV4 "iface"`. Unlike Rover, which only knows non-loopback interfaces and fails
/// on any other name, a named loopback interface gives its address, and a name this host does
/// not have gives the node's IP: Rover's default instance name, `{{.Rover.HostIPV4 "en0"}}`,
/// names a macOS interface that Linux hosts lack, and would otherwise report nothing. An
/// interface without an IPv4 address is an error.
fn rover_host_ipv4(args: &[Value]) -> Result<Value, FuncError> {
    let name = string_argument(args, 1, "HostIPV4")?;
    let interface = field(field(args.first(), INTERFACES), name);
    match (interface, field(interface, "v4")) {
        (Some(_), Some(Value::String(ip))) => Ok(Value::from(ip.as_str())),
        (Some(_), _) => Err(FuncError::Generic(format!(
            "interface {name} has no IPv4 address"
        ))),
        (None, _) => field(args.first(), HOST_IP)
            .cloned()
            .ok_or_else(|| FuncError::Generic("no host IP".to_owned())),
    }
}

/// `.Rover.HostIPV6 "iface"`: the interface's IPv6 address (a global one before a link-local
/// one); an error when the interface is missing or has none, as in Rover.
fn rover_host_ipv6(args: &[Value]) -> Result<Value, FuncError> {
    let name = string_argument(args, 1, "HostIPV6")?;
    match field(field(field(args.first(), INTERFACES), name), "v6") {
        Some(Value::String(ip)) => Ok(Value::from(ip.as_str())),
        _ => Err(FuncError::Generic(format!(
            "no IPv6 address on interface {name}"
        ))),
    }
}

/// `.Finder.RegexMatchGroup N`: group N of `match_cmd` (0 is the whole match). Rover 0.5.0 also
/// refuses the last group (an off-by-one); here every group of the pattern is reachable.
fn finder_regex_match_group(args: &[Value]) -> Result<Value, FuncError> {
    let Some(Value::Array(groups)) = field(args.first(), GROUPS) else {
        return Err(FuncError::Generic("not a finder".to_owned()));
    };
    let index = match args.get(1) {
        Some(Value::Number(number)) => number.as_u64(),
        _ => None,
    }
    .ok_or_else(|| FuncError::ExactlyXArgs("RegexMatchGroup".to_owned(), 1))?;
    usize::try_from(index)
        .ok()
        .and_then(|index| groups.get(index))
        .cloned()
        .ok_or_else(|| FuncError::Generic(format!("match_cmd has no group {index}")))
}

/// `equalsOrDefault EQ IF_SAME VALUE`: IF_SAME when VALUE equals EQ, else VALUE (Rover's one
/// custom template function).
fn equals_or_default(args: &[Value]) -> Result<Value, FuncError> {
    match args {
        [equal, if_same, value] => Ok(if value == equal { if_same } else { value }.clone()),
        _ => Err(FuncError::ExactlyXArgs("equalsOrDefault".to_owned(), 3)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_with_arguments_become_functions_outside_literals() {
        let (text, uses_interfaces) = rewrite_methods_with_arguments(
            r#"a.Rover.HostIPV4 {{.Rover.HostIPV4 "en0"}}-{{ "x.Rover.HostIPV6" }}{{/* .Finder.RegexMatchGroup */}}{{$.Finder.RegexMatchGroup 1}}{{ $v.Rover.HostIPV4 }}{{.Rover.HostIPV4x}}"#,
        );
        assert_eq!(
            text,
            r#"a.Rover.HostIPV4 {{__roverHostIPV4 $.Rover "en0"}}-{{ "x.Rover.HostIPV6" }}{{/* .Finder.RegexMatchGroup */}}{{__finderRegexMatchGroup $.Finder 1}}{{ $v.Rover.HostIPV4 }}{{.Rover.HostIPV4x}}"#
        );
        assert!(uses_interfaces);
        let (_, uses_interfaces) = rewrite_methods_with_arguments("{{.Finder.RegexMatchGroup 1}}");
        assert!(!uses_interfaces);
    }
}
