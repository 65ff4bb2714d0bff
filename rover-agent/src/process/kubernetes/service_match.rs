//! Which Service a pod belongs to: one in its namespace whose selector is not empty and whose
//! every `key: value` is among the pod's labels. When several select it, the shortest name wins,
//! then the first in lexical order, so the choice does not depend on listing order.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};

pub fn service_of_pod<'a>(pod: &Pod, services: &'a [Arc<Service>]) -> Option<&'a Service> {
    services
        .iter()
        .map(Arc::as_ref)
        .filter(|service| service.metadata.namespace == pod.metadata.namespace)
        .filter(|service| selects(service, pod))
        .min_by(|a, b| {
            let (a, b) = (name(a), name(b));
            a.len().cmp(&b.len()).then_with(|| a.cmp(b))
        })
}

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service
        .spec
        .as_ref()
        .and_then(|spec| spec.selector.as_ref())
    else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.and_then(|labels| labels.get(key)) == Some(value))
}

fn name(service: &Service) -> &str {
    service.metadata.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn pod(namespace: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-7d4b9-x2x9k".to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(map(labels)),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn service(namespace: &str, name: &str, selector: Option<&[(&str, &str)]>) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                selector: selector.map(map),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    fn chosen<'a>(pod: &Pod, services: &'a [Arc<Service>]) -> Option<&'a str> {
        service_of_pod(pod, services).and_then(|service| service.metadata.name.as_deref())
    }

    #[test]
    fn a_selector_matches_when_all_its_labels_are_on_the_pod() {
        let pod = pod(
            "shop",
            &[
                ("app", "web"),
                ("tier", "front"),
                ("pod-template-hash", "7d4b9"),
            ],
        );
        let services = [
            service("shop", "web", Some(&[("app", "web"), ("tier", "front")])),
            service("shop", "api", Some(&[("app", "api")])),
        ];
        assert_eq!(chosen(&pod, &services), Some("web"));
    }

    #[test]
    fn a_selector_with_a_label_the_pod_lacks_or_differs_on_does_not_match() {
        let pod = pod("shop", &[("app", "web")]);
        let services = [
            service(
                "shop",
                "web-canary",
                Some(&[("app", "web"), ("track", "canary")]),
            ),
            service("shop", "web-v2", Some(&[("app", "web-v2")])),
        ];
        assert_eq!(chosen(&pod, &services), None);
    }

    #[test]
    fn empty_or_missing_selectors_select_no_pod() {
        let pod = pod("shop", &[("app", "web")]);
        let services = [
            service("shop", "external", None),
            service("shop", "headless", Some(&[])),
        ];
        assert_eq!(chosen(&pod, &services), None);
        let no_spec = Arc::new(Service {
            metadata: ObjectMeta {
                name: Some("bare".to_owned()),
                namespace: Some("shop".to_owned()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        });
        assert_eq!(chosen(&pod, &[no_spec]), None);
    }

    #[test]
    fn only_services_of_the_pods_namespace_count() {
        let pod = pod("shop", &[("app", "web")]);
        let services = [
            service("other", "a", Some(&[("app", "web")])),
            service("shop", "web", Some(&[("app", "web")])),
        ];
        assert_eq!(chosen(&pod, &services), Some("web"));
        assert_eq!(chosen(&pod, &services[..1]), None);
    }

    #[test]
    fn several_matches_pick_the_shortest_name_then_the_lexically_first() {
        let pod = pod("shop", &[("app", "web")]);
        let services = [
            service("shop", "web-internal", Some(&[("app", "web")])),
            service("shop", "webz", Some(&[("app", "web")])),
            service("shop", "weba", Some(&[("app", "web")])),
            service("shop", "web-public", Some(&[("app", "web")])),
        ];
        assert_eq!(chosen(&pod, &services), Some("weba"));
        // The same whatever the order they are listed in.
        let mut reversed = services.to_vec();
        reversed.reverse();
        assert_eq!(chosen(&pod, &reversed), Some("weba"));
    }

    #[test]
    fn a_pod_without_labels_has_no_service() {
        let mut unlabelled = pod("shop", &[]);
        unlabelled.metadata.labels = None;
        let services = [service("shop", "web", Some(&[("app", "web")]))];
        assert_eq!(chosen(&unlabelled, &services), None);
    }
}
