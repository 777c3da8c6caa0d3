{{/*
Names, labels, the cluster config (cluster.toml) and the value checks shared by every template.
*/}}

{{- define "fathom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fathom.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fathom.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fathom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: include with (dict "ctx" $ "component" "worker"). */}}
{{- define "fathom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fathom.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fathom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fathom.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fathom.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fathom.etcdExternal" -}}
{{- if gt (len .Values.etcd.external.endpoints) 0 }}true{{ end }}
{{- end }}

{{- define "fathom.etcdHeadless" -}}
{{- printf "%s-etcd-headless" (include "fathom.fullname" .) }}
{{- end }}

{{/* etcd client URLs, one per line. */}}
{{- define "fathom.etcdEndpoints" -}}
{{- if include "fathom.etcdExternal" . }}
{{- range .Values.etcd.external.endpoints }}
{{ . }}
{{- end }}
{{- else }}
{{ printf "http://%s-etcd.%s.svc:%d" (include "fathom.fullname" .) .Release.Namespace (int .Values.etcd.clientPort) }}
{{- end }}
{{- end }}

{{- define "fathom.coordinatorAddress" -}}
{{- printf "%s-coordinator.%s.svc:%d" (include "fathom.fullname" .) .Release.Namespace (int .Values.coordinator.grpcPort) }}
{{- end }}

{{- define "fathom.modelPath" -}}
{{- if eq .Values.model.source "synth" }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.synth.preset }}
{{- else }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) (trimPrefix "/" .Values.model.path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/*
Fails the render on values that would give an invalid or inconsistent cluster, with a message
naming the value. (The binaries validate cluster.toml again; this catches mistakes at install.)
*/}}
{{- define "fathom.validate" -}}
{{- $w := int .Values.workers.replicas }}
{{- $tp := int .Values.parallel.tp }}
{{- if lt $w 1 }}
{{- fail (printf "workers.replicas must be >= 1 (got %d)" $w) }}
{{- end }}
{{- if or (lt $tp 1) (ne (mod $w $tp) 0) }}
{{- fail (printf "parallel.tp (%d) must divide workers.replicas (%d): world_size = workers.replicas" $tp $w) }}
{{- end }}
{{- if not (has .Values.workers.comm (list "nccl" "tcp")) }}
{{- fail (printf "workers.comm must be nccl or tcp (got %q)" .Values.workers.comm) }}
{{- end }}
{{- if not (regexMatch "^(cpu|cuda(:[0-9]+)?)$" .Values.workers.device) }}
{{- fail (printf "workers.device must be cpu, cuda or cuda:N (got %q)" .Values.workers.device) }}
{{- end }}
{{- if and (not .Values.workers.gpu.enabled) (ne .Values.workers.device "cpu") }}
{{- fail (printf "workers.gpu.enabled is false but workers.device is %q: set workers.device=cpu" .Values.workers.device) }}
{{- end }}
{{- if and (not .Values.workers.gpu.enabled) (eq .Values.workers.comm "nccl") }}
{{- fail "workers.gpu.enabled is false but workers.comm is nccl: set workers.comm=tcp" }}
{{- end }}
{{- if and .Values.workers.gpu.enabled (eq .Values.workers.device "cpu") }}
{{- fail "workers.device is cpu but workers.gpu.enabled is true: a GPU would be requested and left idle" }}
{{- end }}
{{- if not (has .Values.model.source (list "pvc" "hostPath" "synth")) }}
{{- fail (printf "model.source must be pvc, hostPath or synth (got %q)" .Values.model.source) }}
{{- end }}
{{- if not (include "fathom.etcdExternal" .) }}
{{- if not (has (int .Values.etcd.replicas) (list 1 3 5)) }}
{{- fail (printf "etcd.replicas must be 1, 3 or 5 (got %v)" .Values.etcd.replicas) }}
{{- end }}
{{- end }}
{{- if lt (int .Values.membership.leaseTtlSeconds) 2 }}
{{- fail "membership.leaseTtlSeconds must be >= 2 (keep-alive runs at TTL/2)" }}
{{- end }}
{{- if or (contains "/" .Values.clusterName) (eq .Values.clusterName "") }}
{{- fail (printf "clusterName %q must be non-empty without '/'" .Values.clusterName) }}
{{- end }}
{{- end }}

{{/*
cluster.toml: exactly fathom_common::cluster::ClusterConfig. Strings go through toJson, whose
escapes are valid TOML basic strings. Include with (dict "ctx" $ "adminToken" true|false).
*/}}
{{- define "fathom.clusterToml" -}}
{{- $v := .ctx.Values -}}
# Generated by the fathom Helm chart ({{ .ctx.Release.Name }}); read by
# `fathom coordinator --config` and `fathom worker --config`.
cluster = {{ $v.clusterName | toJson }}

[model]
path = {{ include "fathom.modelPath" .ctx | toJson }}

[parallel]
world_size = {{ int $v.workers.replicas }}
tp = {{ int $v.parallel.tp }}
redundant_slots_per_rank = {{ int $v.parallel.redundantSlotsPerRank }}
{{- if ne (toString $v.parallel.redundantExperts) "" }}
redundant_experts = {{ int $v.parallel.redundantExperts }}
{{- end }}
{{- if ne (toString $v.parallel.maxWorldSize) "" }}
max_world_size = {{ int $v.parallel.maxWorldSize }}
{{- end }}
{{- if ne (toString $v.parallel.minWorldSize) "" }}
min_world_size = {{ int $v.parallel.minWorldSize }}
{{- end }}

[parallel.pinned_replicas]
{{- range $k, $n := $v.parallel.pinnedReplicas }}
{{ $k | toJson }} = {{ int $n }}
{{- end }}

[membership]
etcd_endpoints = {{ splitList "\n" (include "fathom.etcdEndpoints" .ctx | trim) | toJson }}
lease_ttl_s = {{ int $v.membership.leaseTtlSeconds }}

[coordinator]
listen = {{ printf "0.0.0.0:%d" (int $v.coordinator.grpcPort) | toJson }}
advertise = {{ include "fathom.coordinatorAddress" .ctx | toJson }}
metrics_listen = {{ printf "0.0.0.0:%d" (int $v.coordinator.metricsPort) | toJson }}
http_listen = {{ if gt (int $v.coordinator.httpPort) 0 }}{{ printf "0.0.0.0:%d" (int $v.coordinator.httpPort) | toJson }}{{ else }}""{{ end }}
max_queue = {{ int $v.coordinator.maxQueue }}
max_step_tokens = {{ int $v.coordinator.maxStepTokens }}
max_batch = {{ int $v.coordinator.maxBatch }}
kv_block_size = {{ int $v.coordinator.kvBlockSize }}
kv_blocks = {{ int $v.coordinator.kvBlocks }}
expert_load_window_steps = {{ int $v.coordinator.expertLoadWindowSteps }}
{{- if and .adminToken $v.coordinator.adminToken }}
admin_token = {{ $v.coordinator.adminToken | toJson }}
{{- end }}

[worker]
listen = {{ printf "0.0.0.0:%d" (int $v.workers.grpcPort) | toJson }}
# advertise: per pod, given as `--advertise $(POD_IP):{{ int $v.workers.grpcPort }}` on the command line.
device = {{ $v.workers.device | toJson }}
comm = {{ $v.workers.comm | toJson }}
metrics_listen = {{ printf "0.0.0.0:%d" (int $v.workers.metricsPort) | toJson }}
step_deadline_s = {{ int $v.workers.stepDeadlineSeconds }}
{{- end }}

{{/* Model volume (name "model"), for a pod spec's volumes list. */}}
{{- define "fathom.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Init container writing the synthetic checkpoint (model.source: synth). */}}
{{- define "fathom.synthInit" -}}
{{- if eq .Values.model.source "synth" }}
- name: synth-model
  image: {{ include "fathom.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - fathom
    - checkpoint
    - synth
    - --preset
    - {{ .Values.model.synth.preset | quote }}
    - --dtype
    - {{ .Values.model.synth.dtype | quote }}
    - --seed
    - {{ .Values.model.synth.seed | quote }}
    - --out
    - {{ include "fathom.modelPath" . | quote }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ .Values.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Environment common to every fathom container. */}}
{{- define "fathom.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /var/cache/fathom
{{- end }}
