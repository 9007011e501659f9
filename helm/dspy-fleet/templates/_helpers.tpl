{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters a label allows. */}}
{{- define "dspy-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "dspy-fleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's resources: fullname-component (component names are short). */}}
{{- define "dspy-fleet.componentName" -}}
{{- printf "%s-%s" (include "dspy-fleet.fullname" .ctx | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "dspy-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Standard labels of every resource. */}}
{{- define "dspy-fleet.labels" -}}
helm.sh/chart: {{ include "dspy-fleet.chart" . }}
{{ include "dspy-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dspy-fleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "dspy-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dspy-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: call with (dict "ctx" $ "component" "api"). */}}
{{- define "dspy-fleet.componentLabels" -}}
{{ include "dspy-fleet.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dspy-fleet.componentSelectorLabels" -}}
{{ include "dspy-fleet.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dspy-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dspy-fleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Image of the api or worker: call with (dict "ctx" $ "repository" ...). */}}
{{- define "dspy-fleet.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .ctx.Values.image.tag -}}
{{- if .ctx.Values.image.registry -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "dspy-fleet.secretName" -}}
{{- default (include "dspy-fleet.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "dspy-fleet.redisHost" -}}
{{- include "dspy-fleet.componentName" (dict "ctx" . "component" "redis") -}}
{{- end -}}

{{/* The Secret of the in-chart Redis: its password, the URL carrying it, a redis.conf snippet. */}}
{{- define "dspy-fleet.redisSecretName" -}}
{{- include "dspy-fleet.componentName" (dict "ctx" . "component" "redis") -}}
{{- end -}}

{{/* Where every pod's Redis URL comes from: always a Secret, never a plain value.
     In-chart Redis: key `redis-url` of its Secret (the URL carries the password);
     external Redis: key `redis-url` of the chart's Secret or secrets.existingSecret. */}}
{{- define "dspy-fleet.redisUrlSecretKeyRef" -}}
secretKeyRef:
{{- if .Values.redis.enabled }}
  name: {{ include "dspy-fleet.redisSecretName" . }}
{{- else }}
  name: {{ include "dspy-fleet.secretName" . }}
{{- end }}
  key: redis-url
{{- end -}}

{{/* Redis URL env var of the api, worker and Flower. With sentinel.enabled the URL is
     built from the values, its data password from the Secret's `redis-password` (Kubernetes
     expands $(REDIS_DATA_PASSWORD) in a later env value), and the Sentinels' password is
     DSPY_FLEET_SENTINEL_PASSWORD from `sentinel-password`; both optional. */}}
{{- define "dspy-fleet.redisUrlEnv" -}}
{{- if .Values.sentinel.enabled }}
- name: REDIS_DATA_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dspy-fleet.secretName" . }}
      key: redis-password
      optional: true
- name: DSPY_FLEET_REDIS_URL
  value: {{ printf "redis+sentinel://:$(REDIS_DATA_PASSWORD)@%s/%s/%d" (join "," .Values.sentinel.hosts) .Values.sentinel.masterName (int .Values.sentinel.db) | quote }}
- name: DSPY_FLEET_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dspy-fleet.secretName" . }}
      key: sentinel-password
      optional: true
{{- else }}
- name: DSPY_FLEET_REDIS_URL
  valueFrom:
    {{- include "dspy-fleet.redisUrlSecretKeyRef" . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* Whether the broker is not the Redis: an external RabbitMQ (or other Redis) whose URL is
     key `broker-url` of the chart's Secret (secrets.brokerUrl) or of secrets.existingSecret
     (secrets.existingSecretHasBrokerUrl). */}}
{{- define "dspy-fleet.separateBroker" -}}
{{- if or .Values.secrets.brokerUrl (and .Values.secrets.existingSecret .Values.secrets.existingSecretHasBrokerUrl) }}true{{ end -}}
{{- end -}}

{{/* Where the broker URL comes from: key `broker-url` when separate, else the Redis URL. */}}
{{- define "dspy-fleet.brokerUrlSecretKeyRef" -}}
{{- if include "dspy-fleet.separateBroker" . -}}
secretKeyRef:
  name: {{ include "dspy-fleet.secretName" . }}
  key: broker-url
{{- else -}}
{{ include "dspy-fleet.redisUrlSecretKeyRef" . }}
{{- end -}}
{{- end -}}

{{/* Environment both the api and the worker read. */}}
{{- define "dspy-fleet.commonEnv" -}}
- name: DSPY_FLEET_ENV
  value: {{ .Values.env | quote }}
- name: DSPY_FLEET_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{ include "dspy-fleet.redisUrlEnv" . }}
{{- if include "dspy-fleet.separateBroker" . }}
- name: DSPY_FLEET_BROKER_URL
  valueFrom:
    {{- include "dspy-fleet.brokerUrlSecretKeyRef" . | nindent 4 }}
{{- end }}
- name: DSPY_FLEET_CONFIG
  value: /etc/dspy-fleet/fleet.yaml
- name: DSPY_FLEET_JOB_TTL_SECONDS
  value: {{ .Values.jobTtlSeconds | quote }}
- name: DSPY_FLEET_SOFT_TIME_LIMIT
  value: {{ .Values.softTimeLimit | quote }}
- name: DSPY_FLEET_TIME_LIMIT
  value: {{ .Values.timeLimit | quote }}
{{- if .Values.mockLlm.enabled }}
- name: DSPY_FLEET_MOCK_LLM_URL
  value: {{ printf "http://%s:8900/v1" (include "dspy-fleet.componentName" (dict "ctx" . "component" "mock-llm")) | quote }}
{{- end }}
{{- end -}}

{{/* Pod annotations that roll the pods when the config or the chart's Secret changes. */}}
{{- define "dspy-fleet.checksumAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if not .Values.secrets.existingSecret }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end -}}

{{/* The read-only config volume and a writable /tmp (the root filesystem is read-only). */}}
{{- define "dspy-fleet.volumes" -}}
- name: config
  configMap:
    name: {{ include "dspy-fleet.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end -}}

{{- define "dspy-fleet.volumeMounts" -}}
- name: config
  mountPath: /etc/dspy-fleet
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Refuse unsafe or inconsistent combinations of values (bitnami-style). */}}
{{- define "dspy-fleet.validateValues" -}}
{{- $messages := list -}}
{{- $prod := eq .Values.env "production" -}}
{{- if and $prod (not .Values.secrets.apiKeys) (not .Values.secrets.existingSecret) -}}
{{- $messages = append $messages "env=production needs API keys: set secrets.apiKeys or secrets.existingSecret (with key api-keys)" -}}
{{- end -}}
{{- if and $prod .Values.redis.enabled -}}
{{- $messages = append $messages "env=production with redis.enabled=true: the in-chart Redis is a single pod for trials; set redis.enabled=false and secrets.redisUrl (or secrets.existingSecret with key redis-url)" -}}
{{- end -}}
{{- if and $prod .Values.mockLlm.enabled -}}
{{- $messages = append $messages "env=production with mockLlm.enabled=true: the mock LLM answers with made-up text; set mockLlm.enabled=false" -}}
{{- end -}}
{{- if and $prod .Values.flower.enabled (not .Values.flower.basicAuthSecret) -}}
{{- $messages = append $messages "env=production with flower.enabled=true needs flower.basicAuthSecret: Flower can revoke and inspect tasks" -}}
{{- end -}}
{{- if .Values.sentinel.enabled -}}
{{- if .Values.redis.enabled -}}
{{- $messages = append $messages "sentinel.enabled=true needs redis.enabled=false: the pods reach the external Redis through its Sentinels" -}}
{{- end -}}
{{- if not .Values.sentinel.hosts -}}
{{- $messages = append $messages "sentinel.enabled=true needs sentinel.hosts (host:port of each Sentinel)" -}}
{{- end -}}
{{- if or .Values.flower.enabled .Values.celeryExporter.enabled (and .Values.worker.autoscaling.enabled (eq .Values.worker.autoscaling.mode "keda")) -}}
{{- $messages = append $messages "sentinel.enabled=true: Flower, celery-exporter and KEDA's Redis scaler are not wired to Sentinel in this chart; set flower.enabled=false, celeryExporter.enabled=false and do not use worker.autoscaling.mode=keda" -}}
{{- end -}}
{{- else if and (not .Values.redis.enabled) (not .Values.secrets.redisUrl) (not .Values.secrets.existingSecret) -}}
{{- $messages = append $messages "redis.enabled=false needs secrets.redisUrl or secrets.existingSecret (with key redis-url)" -}}
{{- end -}}
{{- if and $prod (not .Values.networkPolicy.enabled) (not .Values.networkPolicy.acknowledgeDisabled) -}}
{{- $messages = append $messages "env=production with networkPolicy.enabled=false: anyone who reaches Redis can act as any tenant and Flower shows every tenant's payloads; keep networkPolicy.enabled=true, or set networkPolicy.acknowledgeDisabled=true if your cluster enforces equivalent policies another way" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.serviceMonitor.enabled (not .Values.networkPolicy.metricsFrom) -}}
{{- $messages = append $messages "serviceMonitor.enabled with networkPolicy.enabled needs networkPolicy.metricsFrom (your Prometheus's namespace/pod labels): metrics ports accept no one by default" -}}
{{- end -}}
{{- if le (float64 .Values.timeLimit) (float64 .Values.softTimeLimit) -}}
{{- $messages = append $messages "timeLimit must be greater than softTimeLimit" -}}
{{- end -}}
{{- if and .Values.api.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.api.resources)) -}}
{{- $messages = append $messages "api.autoscaling.enabled scales on CPU utilisation and needs api.resources.requests.cpu" -}}
{{- end -}}
{{- if and .Values.api.autoscaling.enabled (gt (int .Values.api.autoscaling.minReplicas) (int .Values.api.autoscaling.maxReplicas)) -}}
{{- $messages = append $messages "api.autoscaling.minReplicas must not exceed api.autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.worker.autoscaling.enabled (gt (int .Values.worker.autoscaling.minReplicas) (int .Values.worker.autoscaling.maxReplicas)) -}}
{{- $messages = append $messages "worker.autoscaling.minReplicas must not exceed worker.autoscaling.maxReplicas" -}}
{{- end -}}
{{- if and .Values.worker.autoscaling.enabled (eq .Values.worker.autoscaling.mode "keda") (not .Values.redis.enabled) (not .Values.worker.autoscaling.keda.redisAddress) -}}
{{- $messages = append $messages "worker.autoscaling.mode=keda with an external Redis needs worker.autoscaling.keda.redisAddress (host:port)" -}}
{{- end -}}
{{- if and .Values.worker.autoscaling.enabled (eq .Values.worker.autoscaling.mode "hpa") (not .Values.celeryExporter.enabled) -}}
{{- $messages = append $messages "worker.autoscaling.mode=hpa reads celery_queue_length from celery-exporter: set celeryExporter.enabled=true" -}}
{{- end -}}
{{- if $messages -}}
{{- printf "\nVALUES VALIDATION:\n%s" (join "\n" $messages) | fail -}}
{{- end -}}
{{- end -}}
