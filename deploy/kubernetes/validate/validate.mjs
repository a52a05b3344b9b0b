// Validates custom resources against the openAPIV3Schema of their CRDs, as packaged by kubernetes-models
// (generated from prometheus-operator's and KEDA's released CRDs; versions in package.json).
// Reads a JSON array of objects on stdin, writes [{kind, name, error}] on stdout; error is null when valid.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((object) => {
  const Model = MODELS[`${object.apiVersion}/${object.kind}`];
  const result = { kind: object.kind, name: object.metadata?.name ?? null, error: null };
  if (!Model) {
    result.error = `no schema here for ${object.apiVersion} ${object.kind}`;
    return result;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    result.error = String(error.message ?? error);
  }
  return result;
});
process.stdout.write(JSON.stringify(results));
