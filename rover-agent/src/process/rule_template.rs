//! Go templates in process names, with the context Rover gives them. Host rules (Rover 0.5.0's
//! scanner) see `.Process`, `.Rover` and `.Finder`; Kubernetes analyzers see `.Process`, `.Rover`,
//! `.Pod` and `.Container` (`process::kubernetes::analyzer`). Shared here:
//!
//! - `.Process`: `Pid`, `ExeName`, `ExeFilePath`, `CommandLine`, `ExeNameInCommandLine` (argv[0]),
//!   `WorkDir`;
//! - `.Rover`: `InstanceID`, `HostName`, `HostIPV4 "iface"`, `HostIPV6 "iface"`;
//! - the function `equalsOrDefault EQ IF_SAME VALUE` (IF_SAME when VALUE equals EQ, else VALUE),
//!   beside gtmpl's built-ins (`eq`, `ne`, `lt`, `le`, `gt`, `ge`, `and`, `or`, `not`, `len`,
//!   `index`, `print`, `printf`, `println`, `urlquery`, `call`).
//!
//! gtmpl calls a function-valued field with its receiver only and refuses arguments, so a method
//! with arguments (`{{.Rover.HostIPV4 "en0"}}`) cannot be a field. Before parsing, the template
//! text is rewritten so that each call of such a method becomes a template function taking its
//! receiver first: `.Rover.HostIPV4 "en0"` → `__HostIPV4 .Rover "en0"`, `$c.EnvValue "A"` →
//! `__EnvValue $c "A"`, `(X).EnvValue "A"` → `__EnvValue (X) "A"`, `.EnvValue "A"` (dot is the
//! receiver) → `__EnvValue . "A"` (in actions only, never in string literals or comments). The
//! function reads its data from the receiver object, which carries it in hidden `__` fields.
//! Methods without arguments are plain values, or functions of their receiver when they read
//! `/proc` lazily.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use gtmpl::{Context, Func, FuncError, Value};

use super::host_ip::InterfaceIps;

/// Methods with arguments, by name, and the functions that implement them (see the module doc).
pub(crate) type MethodsWithArguments = [(&'static str, Func)];

/// `.Rover`'s methods with arguments.
pub(crate) const ROVER_METHODS: &MethodsWithArguments =
    &[("HostIPV4", rover_host_ipv4), ("HostIPV6", rover_host_ipv6)];

/// `.Finder`'s methods with arguments (host rules only).
pub(crate) const FINDER_METHODS: &MethodsWithArguments =
    &[("RegexMatchGroup", finder_regex_match_group)];

/// Prefix of the function a method with arguments becomes.
const METHOD_FUNCTION_PREFIX: &str = "__";

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
    /// The methods with arguments it calls, so a context holds only the data they read.
    pub(crate) methods_used: Vec<&'static str>,
}

/// Why a template could not be rendered: gtmpl's message, without the dump of a whole context
/// object that some of its errors carry.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RenderError(String);

impl From<gtmpl::error::ExecError> for RenderError {
    fn from(error: gtmpl::error::ExecError) -> Self {
        use gtmpl::error::ExecError;
        Self(match error {
            ExecError::NoFiledFor(name, _) => format!("no field {name}"),
            ExecError::InvalidRange(_) => "range over a value that is no list or map".to_owned(),
            error => error.to_string(),
        })
    }
}

/// A template of the configuration that cannot be used, named by its config key.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{key}: cannot parse the template {template:?}")]
    Parse {
        /// e.g. `process_discovery.kubernetes.analyzers[2].filters[0]`.
        key: String,
        /// As written in the configuration.
        template: String,
        #[source]
        source: Box<gtmpl::error::ParseError>,
    },
    #[error("{key}: must be set")]
    Empty { key: String },
}

impl RuleTemplate {
    /// The template of config key `key`; an empty one is an error, as in Rover.
    pub(crate) fn parse_setting(
        key: String,
        source: &str,
        method_tables: &[&MethodsWithArguments],
    ) -> Result<Self, TemplateError> {
        Self::parse_setting_as(key, source, source, method_tables)
    }

    /// An expression of config key `key`, parsed as the template `{{<source>}}` (Rover's
    /// filters).
    pub(crate) fn parse_expression_setting(
        key: String,
        source: &str,
        method_tables: &[&MethodsWithArguments],
    ) -> Result<Self, TemplateError> {
        Self::parse_setting_as(key, source, &format!("{{{{{source}}}}}"), method_tables)
    }

    fn parse_setting_as(
        key: String,
        source: &str,
        text: &str,
        method_tables: &[&MethodsWithArguments],
    ) -> Result<Self, TemplateError> {
        if source.trim().is_empty() {
            return Err(TemplateError::Empty { key });
        }
        Self::parse(text, method_tables).map_err(|error| TemplateError::Parse {
            key,
            template: source.to_owned(),
            source: error,
        })
    }

    /// Parses `source`, where the methods of `method_tables` may be called with arguments.
    /// gtmpl's errors are large: boxed, to keep results small.
    fn parse(
        source: &str,
        method_tables: &[&MethodsWithArguments],
    ) -> Result<Self, Box<gtmpl::error::ParseError>> {
        let methods: Vec<(&'static str, Func)> = method_tables
            .iter()
            .flat_map(|table| table.iter().copied())
            .collect();
        let names: Vec<&'static str> = methods.iter().map(|(name, _)| *name).collect();
        let (text, used) = rewrite_methods_with_arguments(source, &names);
        let mut template = gtmpl::Template::default();
        template.add_func("equalsOrDefault", equals_or_default);
        for (name, function) in methods {
            template.add_func(&format!("{METHOD_FUNCTION_PREFIX}{name}"), function);
        }
        template.parse(text).map_err(Box::new)?;
        Ok(Self {
            template,
            uses_interfaces: used
                .iter()
                .any(|name| ROVER_METHODS.iter().any(|(rover, _)| rover == name)),
            methods_used: used,
        })
    }

    pub(crate) fn render(&self, context: &Context) -> Result<String, RenderError> {
        self.template.render(context).map_err(RenderError::from)
    }
}

/// What `.Process` shows of one process.
pub struct ProcessValues<'a> {
    pub pid: u32,
    /// The executable's name (gopsutil's `Name`, as Rover's `ExeName`).
    pub exe_name: &'a str,
    /// The first argument (`ExeNameInCommandLine`).
    pub argv0: &'a str,
    /// The arguments joined by spaces.
    pub command_line: &'a str,
    /// `/proc/PID`, read when a template asks for `ExeFilePath` or `WorkDir`.
    pub proc_dir: &'a Path,
}

/// What `.Rover` shows: the agent and its host.
pub struct RoverValues<'a> {
    pub instance_id: &'a str,
    pub host_name: &'a str,
    /// The node's IP: `.Rover.HostIPV4` of an interface the host lacks.
    pub host_ip: IpAddr,
    /// This scan's interfaces; `None` when no template asks for them.
    pub interfaces: Option<&'a HashMap<String, InterfaceIps>>,
}

/// What `.Finder` shows: the rule that matched.
pub(crate) struct FinderValues<'a> {
    pub(crate) layer: &'a str,
    /// `match_cmd`'s groups against the command line; an unmatched group is empty.
    pub(crate) groups: &'a [String],
}

/// The template context of a host rule for one process.
pub(crate) fn context(
    process: &ProcessValues<'_>,
    rover: &RoverValues<'_>,
    finder: &FinderValues<'_>,
) -> Context {
    let finder = object([
        ("Layer", Value::from(finder.layer)),
        (GROUPS, Value::from(finder.groups)),
    ]);
    Context::from(object([
        ("Process", process_object(process)),
        ("Rover", rover_object(rover)),
        ("Finder", finder),
    ]))
}

/// `.Process`.
pub(crate) fn process_object(process: &ProcessValues<'_>) -> Value {
    object([
        ("Pid", Value::from(process.pid)),
        ("ExeName", Value::from(process.exe_name)),
        ("CommandLine", Value::from(process.command_line)),
        ("ExeNameInCommandLine", Value::from(process.argv0)),
        ("ExeFilePath", Value::from(process_exe_file_path as Func)),
        ("WorkDir", Value::from(process_work_dir as Func)),
        (PROC_DIR, Value::from(process.proc_dir.to_string_lossy())),
    ])
}

/// `.Rover`.
pub(crate) fn rover_object(rover: &RoverValues<'_>) -> Value {
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
    object([
        ("InstanceID", Value::from(rover.instance_id)),
        ("HostName", Value::from(rover.host_name)),
        (HOST_IP, Value::from(rover.host_ip.to_string())),
        (INTERFACES, Value::Map(interfaces)),
    ])
}

/// A template object (a missing field is an error, as in Go).
pub(crate) fn object<const N: usize>(fields: [(&str, Value); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value))
            .collect(),
    )
}

/// Rewrites each call of a method with arguments into its function (see the module doc);
/// returns the text and the names of the methods it rewrote.
fn rewrite_methods_with_arguments(
    source: &str,
    methods: &[&'static str],
) -> (String, Vec<&'static str>) {
    let mut out = String::with_capacity(source.len());
    let mut used = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start + 2]);
        rest = &rest[start + 2..];
        // Where in `out` this action's open parentheses are, and where the group that closed
        // last starts: `(X).Method` puts the function before its `(`.
        let mut open_groups: Vec<usize> = Vec::new();
        let mut closed_group: Option<usize> = None;
        let mut previous: Option<char> = None;
        loop {
            if rest.is_empty() || rest.starts_with("}}") {
                break;
            }
            if let Some(end) = literal_end(rest) {
                out.push_str(&rest[..end]);
                rest = &rest[end..];
                previous = Some('"');
                continue;
            }
            let Some(c) = rest.chars().next() else { break };
            let after_group = previous == Some(')');
            let at_boundary = previous
                .is_none_or(|p| !(p.is_alphanumeric() || matches!(p, '_' | '.' | ')' | '$')));
            if (c == '.' && (at_boundary || after_group)) || (c == '$' && at_boundary) {
                let chain = FieldChain::scan(rest);
                let method = chain
                    .fields
                    .last()
                    .and_then(|last| methods.iter().find(|name| *name == last));
                let group_start = if c == '.' && after_group {
                    closed_group.map(Some)
                } else {
                    Some(None)
                };
                if let (Some(&name), Some(group_start)) = (method, group_start) {
                    let function = format!("{METHOD_FUNCTION_PREFIX}{name} ");
                    let receiver_fields: String = chain.fields[..chain.fields.len() - 1]
                        .iter()
                        .map(|field| format!(".{field}"))
                        .collect();
                    match group_start {
                        Some(group_start) => {
                            out.insert_str(group_start, &function);
                            out.push_str(&receiver_fields);
                        }
                        None => {
                            out.push_str(&function);
                            let receiver = format!("{}{receiver_fields}", chain.base);
                            out.push_str(if receiver.is_empty() { "." } else { &receiver });
                        }
                    }
                    used.push(name);
                } else {
                    out.push_str(&rest[..chain.len]);
                }
                previous = rest[..chain.len].chars().next_back();
                rest = &rest[chain.len..];
                continue;
            }
            match c {
                '(' => open_groups.push(out.len()),
                ')' => closed_group = open_groups.pop(),
                _ => {}
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            previous = Some(c);
        }
    }
    out.push_str(rest);
    (out, used)
}

/// A variable or field chain in an action: `$`, `$name` or nothing, then `.Field`s.
struct FieldChain<'a> {
    base: &'a str,
    fields: Vec<&'a str>,
    /// Its length in the text: at least 1 from a `$` or a `.`.
    len: usize,
}

impl<'a> FieldChain<'a> {
    fn scan(text: &'a str) -> Self {
        let identifier_len = |text: &str| {
            text.char_indices()
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
                .map_or(text.len(), |(index, _)| index)
        };
        let base_len = text
            .strip_prefix('$')
            .map_or(0, |name| 1 + identifier_len(name));
        let mut len = base_len;
        let mut fields = Vec::new();
        while let Some(after_dot) = text[len..].strip_prefix('.') {
            if !after_dot.starts_with(|c: char| c.is_alphabetic() || c == '_') {
                break;
            }
            let field_len = identifier_len(after_dot);
            fields.push(&after_dot[..field_len]);
            len += 1 + field_len;
        }
        Self {
            base: &text[..base_len],
            fields,
            // A lone `.` (dot itself) is one character.
            len: len.max(1),
        }
    }
}

/// The length of a string, raw string, character literal or comment at the start of `text`.
fn literal_end(text: &str) -> Option<usize> {
    match text.as_bytes().first()? {
        b'"' => Some(quoted_end(text, '"')),
        b'\'' => Some(quoted_end(text, '\'')),
        b'`' => Some(text[1..].find('`').map_or(text.len(), |end| end + 2)),
        b'/' if text.starts_with("/*") => {
            Some(text[2..].find("*/").map_or(text.len(), |end| end + 4))
        }
        _ => None,
    }
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

/// A field of an object or map value.
pub(crate) fn field<'a>(receiver: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    match receiver? {
        Value::Object(fields) | Value::Map(fields) => fields.get(name),
        _ => None,
    }
}

/// Argument `index` of a method's function (0 is the receiver), which must be a string.
pub(crate) fn string_argument<'a>(
    args: &'a [Value],
    index: usize,
    method: &str,
) -> Result<&'a str, FuncError> {
    match args.get(index) {
        Some(Value::String(text)) => Ok(text),
        _ => Err(FuncError::Generic(format!(
            "{method} takes a string as argument {index}"
        ))),
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

    const METHODS: &[&str] = &["HostIPV4", "HostIPV6", "RegexMatchGroup", "EnvValue"];

    fn rewrite(source: &str) -> (String, Vec<&'static str>) {
        rewrite_methods_with_arguments(source, METHODS)
    }

    #[test]
    fn methods_with_arguments_become_functions_outside_literals() {
        let (text, used) = rewrite(
            r#"a.Rover.HostIPV4 {{.Rover.HostIPV4 "en0"}}-{{ "x.Rover.HostIPV6" }}{{/* .Finder.RegexMatchGroup */}}{{$.Finder.RegexMatchGroup 1}}{{ $v.Rover.HostIPV4 }}{{.Rover.HostIPV4x}}"#,
        );
        assert_eq!(
            text,
            r#"a.Rover.HostIPV4 {{__HostIPV4 .Rover "en0"}}-{{ "x.Rover.HostIPV6" }}{{/* .Finder.RegexMatchGroup */}}{{__RegexMatchGroup $.Finder 1}}{{ __HostIPV4 $v.Rover }}{{.Rover.HostIPV4x}}"#
        );
        assert_eq!(used, ["HostIPV4", "RegexMatchGroup", "HostIPV4"]);
    }

    #[test]
    fn receivers_may_be_dot_variables_and_groups() {
        let cases = [
            (
                r#"{{with .C}}{{.EnvValue "A"}}{{end}}"#,
                r#"{{with .C}}{{__EnvValue . "A"}}{{end}}"#,
            ),
            (
                r#"{{$c := .C}}{{$c.EnvValue "A"}}"#,
                r#"{{$c := .C}}{{__EnvValue $c "A"}}"#,
            ),
            (
                r#"{{(index .Cs 1).EnvValue "A"}}"#,
                r#"{{__EnvValue (index .Cs 1) "A"}}"#,
            ),
            (
                r#"{{eq ((.P.Find "x").Sub.EnvValue "A") (print "(")}}"#,
                r#"{{eq (__EnvValue (.P.Find "x").Sub "A") (print "(")}}"#,
            ),
            (
                r#"{{ 1.5 | printf "%.1f" }}"#,
                r#"{{ 1.5 | printf "%.1f" }}"#,
            ),
            ("{{.}}{{$}}{{ . }}", "{{.}}{{$}}{{ . }}"),
            // Unbalanced: left for the parser to refuse.
            (r#"{{).EnvValue "A"}}"#, r#"{{).EnvValue "A"}}"#),
        ];
        for (source, expected) in cases {
            assert_eq!(rewrite(source).0, expected, "{source}");
        }
    }

    #[test]
    fn interface_methods_are_noticed() {
        let parse = |source| RuleTemplate::parse(source, &[ROVER_METHODS, FINDER_METHODS]);
        assert!(
            parse(r#"{{"lo" | .Rover.HostIPV6}}"#)
                .unwrap()
                .uses_interfaces
        );
        assert!(
            !parse("{{.Finder.RegexMatchGroup 1}}")
                .unwrap()
                .uses_interfaces
        );
        // A method of another table is not rewritten: a field that does not exist.
        let template = RuleTemplate::parse(r#"{{.Rover.HostIPV4 "lo"}}"#, &[FINDER_METHODS]);
        assert!(!template.unwrap().uses_interfaces);
    }
}
