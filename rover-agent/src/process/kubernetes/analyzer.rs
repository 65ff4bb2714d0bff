//! Names of the processes of pods (`process_discovery.kubernetes.analyzers[]`, Rover's
//! `pkg/process/finders/kubernetes`): each analyzer has `filters` (Go-template conditions) and
//! `layer`, `service_name`, `instance_name`, `process_name` (templates) and `labels`. The first
//! active analyzer whose filters all hold names a process.
//!
//! As in Rover (`config.go`, `template.go`): a filter is an expression, rendered as
//! `{{<filter>}}`, whose output must be a Go boolean (`strconv.ParseBool`: `true`, `True`, `TRUE`,
//! `t`, `T`, `1` and their false forms), anything else being an error; an analyzer without
//! filters holds for every process; every template of every analyzer, active or not, must parse
//! at start. Templates see `.Pod` and `.Container` (`pod_context`), `.Process` and `.Rover`
//! (`rule_template`), filters and names alike (Rover gives filters no `.Rover` and names no
//! `.Pod.Has…`; a superset breaks no Rover config).

mod pod_context;
mod unique_names;

use gtmpl::Context;
use k8s_openapi::api::core::v1::{Pod, Service};

use crate::config::KubernetesAnalyzerSettings;
use crate::process::entity::EntityNames;
use crate::process::rule_template::{
    MethodsWithArguments, ProcessValues, ROVER_METHODS, RenderError, RoverValues, RuleTemplate,
    process_object, rover_object,
};

/// Why the analyzers could not be built: a config error, naming its key.
pub use crate::process::rule_template::TemplateError as Error;
use pod_context::PodNeeds;
pub use unique_names::{NamedProcess, make_process_names_unique};

/// Why a process could not be named. Rover reports such a process under no analyzer.
#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("{key}: cannot render {template:?}")]
    Render {
        /// The template's config key, as in [`Error::Parse`].
        key: String,
        template: String,
        #[source]
        source: RenderError,
    },
    #[error("{key}: {template:?} gave {output:?}, not a boolean")]
    NotBoolean {
        key: String,
        template: String,
        output: String,
    },
}

impl AnalyzeError {
    /// The config key of the template that failed, to warn once per key.
    pub fn key(&self) -> &str {
        match self {
            Self::Render { key, .. } | Self::NotBoolean { key, .. } => key,
        }
    }
}

/// What the templates see of one process.
pub struct AnalyzerInput<'a> {
    pub pod: &'a Pod,
    /// The Service chosen for the pod, if any (`.Pod.ServiceName`).
    pub service: Option<&'a Service>,
    /// The pod's container (regular, init or ephemeral) the process runs in.
    pub container_name: &'a str,
    pub process: ProcessValues<'a>,
    pub rover: RoverValues<'a>,
}

/// The configured analyzers, parsed.
pub struct Analyzers {
    analyzers: Vec<Analyzer>,
    uses_interfaces: bool,
    pod_needs: PodNeeds,
    /// How many templates all analyzers have.
    templates: usize,
}

struct Analyzer {
    active: bool,
    filters: Vec<KeyedTemplate>,
    layer: String,
    service_name: KeyedTemplate,
    instance_name: KeyedTemplate,
    process_name: KeyedTemplate,
    labels: Vec<String>,
}

/// A template with its config key and source, for error messages.
struct KeyedTemplate {
    key: String,
    source: String,
    template: RuleTemplate,
    /// Its place in a [`ContainerRenders`].
    id: usize,
    roots: Roots,
    /// Set when the whole template is one `.Process` text field (`{{.Process.ExeName}}`, every
    /// shipped `process_name`): its output is that field, with no context built (naming a
    /// node's processes for the first time spent about 40% of its time rendering it).
    field: Option<ProcessField>,
}

/// A text field of `.Process` that a template may consist of alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcessField {
    ExeName,
    CommandLine,
    ExeNameInCommandLine,
}

impl ProcessField {
    /// The field a template consists of: one action, `{{.Process.<Field>}}` (spaces allowed
    /// inside the braces, as Go allows them), and no text around it.
    fn alone_in(source: &str) -> Option<Self> {
        let action = source.strip_prefix("{{")?.strip_suffix("}}")?;
        if action.contains("{{") || action.contains("}}") {
            return None;
        }
        match action.trim_matches(' ') {
            ".Process.ExeName" => Some(Self::ExeName),
            ".Process.CommandLine" => Some(Self::CommandLine),
            ".Process.ExeNameInCommandLine" => Some(Self::ExeNameInCommandLine),
            _ => None,
        }
    }

    fn of<'a>(self, process: &ProcessValues<'a>) -> &'a str {
        match self {
            Self::ExeName => process.exe_name,
            Self::CommandLine => process.command_line,
            Self::ExeNameInCommandLine => process.argv0,
        }
    }
}

/// The parts of the context a template may read, from its source: a template that reads no
/// `.Process` renders the same for every process of a container, and one that reads only
/// `.Process` needs no pod object built. Over-approximated (a word in a string literal counts);
/// a template using variables or `.` itself may read anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Roots {
    pod: bool,
    container: bool,
    process: bool,
    rover: bool,
}

impl Roots {
    const ALL: Self = Self {
        pod: true,
        container: true,
        process: true,
        rover: true,
    };
    const PROCESS: Self = Self {
        pod: false,
        container: false,
        process: true,
        rover: false,
    };

    /// The roots of a template (`{{...}}` actions in text), or with `expression` of a filter
    /// (one action without braces).
    fn of(source: &str, expression: bool) -> Self {
        let actions: Vec<&str> = if expression {
            vec![source]
        } else {
            source
                .split("{{")
                .skip(1)
                .map(|action| action.split("}}").next().unwrap_or(action))
                .collect()
        };
        let reads_anything = actions
            .iter()
            .any(|action| action.contains('$') || has_bare_dot(action));
        if reads_anything {
            return Self::ALL;
        }
        let reads = |root: &str| actions.iter().any(|action| action.contains(root));
        Self {
            pod: reads("Pod"),
            container: reads("Container"),
            process: reads("Process"),
            rover: reads("Rover"),
        }
    }

    /// A distinct index per combination, for [`Contexts`].
    fn index(self) -> usize {
        usize::from(self.pod)
            | usize::from(self.container) << 1
            | usize::from(self.process) << 2
            | usize::from(self.rover) << 3
    }
}

/// Whether `action` uses `.` itself (`{{.}}`, `{{ . }}`), not a field of it (`.Pod`) or a number
/// (`1.5`).
fn has_bare_dot(action: &str) -> bool {
    let bytes = action.as_bytes();
    bytes.iter().enumerate().any(|(index, &byte)| {
        let next = bytes.get(index + 1).copied().unwrap_or(b' ');
        let previous = index.checked_sub(1).map_or(b' ', |before| bytes[before]);
        byte == b'.' && !(next.is_ascii_alphabetic() || next == b'_') && !previous.is_ascii_digit()
    })
}

/// What the templates that read no `.Process` gave for one container of one pod version, so
/// that its other processes do not render them again. Made by [`Analyzers::container_renders`];
/// only valid for processes of that container while its pod and Service stay the same.
pub struct ContainerRenders(Vec<Option<String>>);

/// What the templates that read only `.Process` gave one process (by template id), so that a
/// change of its pod does not render them again. Valid while the process is as it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessRenders(Vec<(usize, String)>);

/// The caches a process's templates are rendered through.
struct Renders<'a> {
    container: &'a mut ContainerRenders,
    process: &'a mut ProcessRenders,
}

/// The contexts of one process, each with only the parts some template reads, built when first
/// asked for.
struct Contexts<'a, 'b> {
    input: &'a AnalyzerInput<'b>,
    needs: PodNeeds,
    built: [Option<Context>; 16],
}

impl Contexts<'_, '_> {
    fn get(&mut self, roots: Roots) -> &Context {
        let (input, needs) = (self.input, self.needs);
        self.built[roots.index()].get_or_insert_with(|| context(input, needs, roots))
    }
}

impl KeyedTemplate {
    /// Methods with arguments in analyzers' templates.
    const METHODS: [&MethodsWithArguments; 3] = [
        ROVER_METHODS,
        pod_context::POD_METHODS,
        pod_context::CONTAINER_METHODS,
    ];

    fn name(key: String, source: &str) -> Result<Self, Error> {
        let template = RuleTemplate::parse_setting(key.clone(), source, &Self::METHODS)?;
        let mut name = Self::new(key, source, template, Roots::of(source, false));
        name.field = ProcessField::alone_in(source);
        Ok(name)
    }

    fn filter(key: String, source: &str) -> Result<Self, Error> {
        let template = RuleTemplate::parse_expression_setting(key.clone(), source, &Self::METHODS)?;
        Ok(Self::new(key, source, template, Roots::of(source, true)))
    }

    fn new(key: String, source: &str, template: RuleTemplate, roots: Roots) -> Self {
        Self {
            key,
            source: source.to_owned(),
            template,
            id: 0,
            roots,
            field: None,
        }
    }

    /// The output for one process; taken from `renders` when the template reads no `.Process`
    /// and another process of the container rendered it, or from `process_renders` when it
    /// reads only `.Process` and rendered it before.
    fn render(
        &self,
        contexts: &mut Contexts<'_, '_>,
        renders: &mut Renders<'_>,
    ) -> Result<String, AnalyzeError> {
        if let Some(field) = self.field {
            return Ok(field.of(&contexts.input.process).to_owned());
        }
        let shared = !self.roots.process;
        if shared && let Some(Some(output)) = renders.container.0.get(self.id) {
            return Ok(output.clone());
        }
        let own = self.roots == Roots::PROCESS;
        if own && let Some((_, output)) = renders.process.0.iter().find(|(id, _)| *id == self.id) {
            return Ok(output.clone());
        }
        let output = self
            .template
            .render(contexts.get(self.roots))
            .map_err(|source| AnalyzeError::Render {
                key: self.key.clone(),
                template: self.source.clone(),
                source,
            })?;
        if shared && let Some(slot) = renders.container.0.get_mut(self.id) {
            *slot = Some(output.clone());
        }
        if own {
            // Kept for every process of the node: no spare capacity.
            renders.process.0.reserve_exact(1);
            renders.process.0.push((self.id, output.clone()));
        }
        Ok(output)
    }

    /// A filter's truth: its output parsed as Go's `strconv.ParseBool` does.
    fn holds(
        &self,
        contexts: &mut Contexts<'_, '_>,
        renders: &mut Renders<'_>,
    ) -> Result<bool, AnalyzeError> {
        let output = self.render(contexts, renders)?;
        match output.as_str() {
            "1" | "t" | "T" | "true" | "True" | "TRUE" => Ok(true),
            "0" | "f" | "F" | "false" | "False" | "FALSE" => Ok(false),
            _ => Err(AnalyzeError::NotBoolean {
                key: self.key.clone(),
                template: self.source.clone(),
                output,
            }),
        }
    }
}

impl Analyzers {
    /// Parses every analyzer's templates; an empty or unparsable one is an error naming its key
    /// (`process_discovery.kubernetes.analyzers[N].<field>`).
    pub fn new(settings: &[KubernetesAnalyzerSettings]) -> Result<Self, Error> {
        let mut analyzers = settings
            .iter()
            .enumerate()
            .map(|(index, settings)| Analyzer::new(index, settings))
            .collect::<Result<Vec<_>, Error>>()?;
        for (id, template) in analyzers
            .iter_mut()
            .flat_map(|analyzer| {
                analyzer.filters.iter_mut().chain([
                    &mut analyzer.service_name,
                    &mut analyzer.instance_name,
                    &mut analyzer.process_name,
                ])
            })
            .enumerate()
        {
            template.id = id;
        }
        let templates = || {
            analyzers.iter().flat_map(|analyzer| {
                analyzer.filters.iter().chain([
                    &analyzer.service_name,
                    &analyzer.instance_name,
                    &analyzer.process_name,
                ])
            })
        };
        let uses_interfaces = templates().any(|template| template.template.uses_interfaces);
        let pod_needs = PodNeeds::of_methods(
            templates().flat_map(|template| template.template.methods_used.iter().copied()),
        );
        let templates = templates().count();
        Ok(Self {
            analyzers,
            uses_interfaces,
            pod_needs,
            templates,
        })
    }

    /// An empty [`ContainerRenders`], for the processes of one container.
    pub fn container_renders(&self) -> ContainerRenders {
        ContainerRenders(vec![None; self.templates])
    }

    /// Whether a template asks for interface addresses (`.Rover.HostIPV4`/`HostIPV6`): without,
    /// [`RoverValues::interfaces`] may be `None`.
    pub fn uses_interfaces(&self) -> bool {
        self.uses_interfaces
    }

    /// The names the first active analyzer whose filters all hold gives the process; `None` when
    /// no analyzer holds. A template that fails (a filter included, as in Rover) leaves the
    /// process unnamed: it is not handed to a later analyzer. `renders` holds what templates
    /// that read no `.Process` gave other processes of the same container, `process_renders`
    /// what those that read only `.Process` gave this process before.
    pub fn analyze(
        &self,
        input: &AnalyzerInput<'_>,
        renders: &mut ContainerRenders,
        process_renders: &mut ProcessRenders,
    ) -> Result<Option<EntityNames>, AnalyzeError> {
        let mut contexts = Contexts {
            input,
            needs: self.pod_needs,
            built: Default::default(),
        };
        let mut renders = Renders {
            container: renders,
            process: process_renders,
        };
        for analyzer in self.analyzers.iter().filter(|analyzer| analyzer.active) {
            if analyzer.filters_hold(&mut contexts, &mut renders)? {
                return analyzer.names(&mut contexts, &mut renders).map(Some);
            }
        }
        Ok(None)
    }
}

impl Analyzer {
    fn new(index: usize, settings: &KubernetesAnalyzerSettings) -> Result<Self, Error> {
        let key = |field: &str| format!("process_discovery.kubernetes.analyzers[{index}].{field}");
        let name = |field: &str, source: &str| KeyedTemplate::name(key(field), source);
        let filters = settings
            .filters
            .iter()
            .enumerate()
            .map(|(filter, source)| {
                KeyedTemplate::filter(key(&format!("filters[{filter}]")), source)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        if settings.layer.trim().is_empty() {
            // The OAP refuses a process without a layer.
            return Err(Error::Empty { key: key("layer") });
        }
        Ok(Self {
            active: settings.active,
            filters,
            layer: settings.layer.clone(),
            service_name: name("service_name", &settings.service_name)?,
            instance_name: name("instance_name", &settings.instance_name)?,
            process_name: name("process_name", &settings.process_name)?,
            labels: settings.labels.clone(),
        })
    }

    /// Whether every filter holds, stopping at the first that does not.
    fn filters_hold(
        &self,
        contexts: &mut Contexts<'_, '_>,
        renders: &mut Renders<'_>,
    ) -> Result<bool, AnalyzeError> {
        for filter in &self.filters {
            if !filter.holds(contexts, renders)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn names(
        &self,
        contexts: &mut Contexts<'_, '_>,
        renders: &mut Renders<'_>,
    ) -> Result<EntityNames, AnalyzeError> {
        Ok(EntityNames {
            layer: self.layer.clone(),
            service_name: self.service_name.render(contexts, renders)?,
            instance_name: self.instance_name.render(contexts, renders)?,
            process_name: self.process_name.render(contexts, renders)?,
            labels: self.labels.clone(),
        })
    }
}

/// The context of one process's templates, with the parts in `roots`.
fn context(input: &AnalyzerInput<'_>, needs: PodNeeds, roots: Roots) -> Context {
    let mut fields = std::collections::HashMap::new();
    if roots.pod {
        let pod = pod_context::pod_object(input.pod, input.service, needs);
        fields.insert("Pod".to_owned(), pod);
    }
    if roots.container {
        let container = pod_context::container_object(input.pod, input.container_name, needs);
        fields.insert("Container".to_owned(), container);
    }
    if roots.process {
        fields.insert("Process".to_owned(), process_object(&input.process));
    }
    if roots.rover {
        fields.insert("Rover".to_owned(), rover_object(&input.rover));
    }
    Context::from(gtmpl::Value::Object(fields))
}

#[cfg(test)]
mod tests;
