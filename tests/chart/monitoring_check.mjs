// Validates prometheus-operator objects (ServiceMonitor, PodMonitor, PrometheusRule) against
// the schemas of @kubernetes-models/prometheus-operator, which are generated from the
// upstream CRDs: types, enums, patterns and required fields.
//   node monitoring_check.mjs NODE_MODULES OBJECTS.json
// Prints one JSON line per object: {"kind", "name", "errors": [...]}. Unknown fields are
// checked separately by the TypeScript compiler (see tests/chart/monitoring.py).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [nodeModules, objectsFile] = process.argv.slice(2);
const objects = JSON.parse(readFileSync(objectsFile, "utf8"));
for (const obj of objects) {
  const [group, version] = obj.apiVersion.split("/");
  const module = join(
    nodeModules, "@kubernetes-models", "prometheus-operator", group, version, `${obj.kind}.js`,
  );
  const models = await import(pathToFileURL(module).href);
  const errors = [];
  try {
    new models[obj.kind](obj).validate();
  } catch (error) {
    errors.push(String(error.message ?? error));
  }
  console.log(JSON.stringify({ kind: obj.kind, name: obj.metadata?.name ?? "", errors }));
}
