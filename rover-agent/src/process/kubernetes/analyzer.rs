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
    object, process_object, rover_object,
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
        Ok(Self::new(key, source, template))
    }

    fn filter(key: String, source: &str) -> Result<Self, Error> {
        let template = RuleTemplate::parse_expression_setting(key.clone(), source, &Self::METHODS)?;
        Ok(Self::new(key, source, template))
    }

    fn new(key: String, source: &str, template: RuleTemplate) -> Self {
        Self {
            key,
            source: source.to_owned(),
            template,
        }
    }

    fn render(&self, context: &Context) -> Result<String, AnalyzeError> {
        self.template
            .render(context)
            .map_err(|source| AnalyzeError::Render {
                key: self.key.clone(),
                template: self.source.clone(),
                source,
            })
    }

    /// A filter's truth: its output parsed as Go's `strconv.ParseBool` does.
    fn holds(&self, context: &Context) -> Result<bool, AnalyzeError> {
        let output = self.render(context)?;
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
        let analyzers = settings
            .iter()
            .enumerate()
            .map(|(index, settings)| Analyzer::new(index, settings))
            .collect::<Result<Vec<_>, Error>>()?;
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
        Ok(Self {
            analyzers,
            uses_interfaces,
            pod_needs,
        })
    }

    /// Whether a template asks for interface addresses (`.Rover.HostIPV4`/`HostIPV6`): without,
    /// [`RoverValues::interfaces`] may be `None`.
    pub fn uses_interfaces(&self) -> bool {
        self.uses_interfaces
    }

    /// The names the first active analyzer whose filters all hold gives the process; `None` when
    /// no analyzer holds. A template that fails (a filter included, as in Rover) leaves the
    /// process unnamed: it is not handed to a later analyzer.
    pub fn analyze(&self, input: &AnalyzerInput<'_>) -> Result<Option<EntityNames>, AnalyzeError> {
        let mut active = self.analyzers.iter().filter(|analyzer| analyzer.active);
        let Some(first) = active.next() else {
            return Ok(None);
        };
        let context = context(input, self.pod_needs);
        for analyzer in std::iter::once(first).chain(active) {
            if analyzer.filters_hold(&context)? {
                return analyzer.names(&context).map(Some);
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
    fn filters_hold(&self, context: &Context) -> Result<bool, AnalyzeError> {
        for filter in &self.filters {
            if !filter.holds(context)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn names(&self, context: &Context) -> Result<EntityNames, AnalyzeError> {
        Ok(EntityNames {
            layer: self.layer.clone(),
            service_name: self.service_name.render(context)?,
            instance_name: self.instance_name.render(context)?,
            process_name: self.process_name.render(context)?,
            labels: self.labels.clone(),
        })
    }
}

/// The context of one process's templates.
fn context(input: &AnalyzerInput<'_>, needs: PodNeeds) -> Context {
    Context::from(object([
        (
            "Pod",
            pod_context::pod_object(input.pod, input.service, needs),
        ),
        (
            "Container",
            pod_context::container_object(input.pod, input.container_name, needs),
        ),
        ("Process", process_object(&input.process)),
        ("Rover", rover_object(&input.rover)),
    ]))
}

#[cfg(test)]
mod tests;
