{{/* The operator's LLMSANDBOX_* settings (docs/operator.md); lists and dicts are JSON. */}}
{{- define "llm-sandbox.operatorEnv" -}}
{{- with .Values.inference.baseURL }}
- name: LLMSANDBOX_DEFAULT_BASE_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.inference.model }}
- name: LLMSANDBOX_DEFAULT_MODEL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.inference.apiKeySecret.name }}
- name: LLMSANDBOX_DEFAULT_API_KEY_SECRET
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_DEFAULT_API_KEY_SECRET_KEY
  value: {{ .Values.inference.apiKeySecret.key | quote }}
- name: LLMSANDBOX_ALLOWED_BASE_URLS
  value: {{ .Values.inference.allowedBaseURLs | toJson | quote }}
- name: LLMSANDBOX_API_KEY_SECRET_LABEL
  value: {{ .Values.inference.apiKeySecretLabel | quote }}
- name: LLMSANDBOX_AGENT_IMAGE
  value: {{ include "llm-sandbox.agentImage" . | quote }}
{{- with .Values.agent.image.pullPolicy }}
- name: LLMSANDBOX_AGENT_IMAGE_PULL_POLICY
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_AGENT_RESOURCES
  value: {{ .Values.agent.resources | toJson | quote }}
- name: LLMSANDBOX_DEFAULT_SANDBOX_IMAGE
  value: {{ .Values.sandbox.defaultImage | quote }}
- name: LLMSANDBOX_SANDBOX_DEFAULT_RESOURCES
  value: {{ .Values.sandbox.defaultResources | toJson | quote }}
- name: LLMSANDBOX_SANDBOX_MAX_LIMITS
  value: {{ .Values.sandbox.maxLimits | toJson | quote }}
- name: LLMSANDBOX_SANDBOX_TMP_SIZE_LIMIT
  value: {{ .Values.sandbox.tmpSizeLimit | quote }}
- name: LLMSANDBOX_SANDBOX_USER_SPLIT
  value: {{ .Values.sandbox.userSplit | quote }}
{{- with .Values.sandbox.requiredRuntimeClass }}
- name: LLMSANDBOX_REQUIRED_RUNTIME_CLASS
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_TASK_SCHEDULING
  value: {{ include "llm-sandbox.taskScheduling" . | quote }}
- name: LLMSANDBOX_ALLOWED_SCHEDULING_FIELDS
  value: {{ .Values.taskPods.allowedSchedulingFields | toJson | quote }}
- name: LLMSANDBOX_TASK_IMAGE_PULL_SECRETS
  value: {{ .Values.taskPods.imagePullSecrets | toJson | quote }}
- name: LLMSANDBOX_ALLOWED_IMAGE_PULL_SECRETS
  value: {{ .Values.taskPods.allowedImagePullSecrets | toJson | quote }}
- name: LLMSANDBOX_INFERENCE_EGRESS
  value: {{ .Values.inferenceEgress | toJson | quote }}
- name: LLMSANDBOX_DNS_EGRESS
  value: {{ .Values.dnsEgress | quote }}
- name: LLMSANDBOX_ISOLATED_DNS_EGRESS
  value: {{ .Values.isolatedDNSEgress | quote }}
{{- with .Values.artifacts.url }}
- name: LLMSANDBOX_ARTIFACTS_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.artifacts.credentialsSecret }}
- name: LLMSANDBOX_ARTIFACTS_CREDENTIALS_SECRET
  value: {{ . | quote }}
{{- end }}
{{- with .Values.artifacts.pvc.claimName }}
- name: LLMSANDBOX_ARTIFACTS_PVC
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_ARTIFACTS_EGRESS
  value: {{ .Values.artifacts.egress | toJson | quote }}
- name: LLMSANDBOX_ARTIFACTS_MAX_FILES
  value: {{ .Values.artifacts.maxFiles | quote }}
- name: LLMSANDBOX_ARTIFACTS_MAX_FILE_BYTES
  value: {{ .Values.artifacts.maxFileBytes | int64 | quote }}
- name: LLMSANDBOX_ARTIFACTS_MAX_TOTAL_BYTES
  value: {{ .Values.artifacts.maxTotalBytes | int64 | quote }}
- name: LLMSANDBOX_EXCLUDED_CIDRS
  value: {{ .Values.excludedCIDRs | toJson | quote }}
- name: LLMSANDBOX_NETPOL_CANARY
  value: {{ .Values.netpolCanary.enabled | quote }}
{{- with .Values.netpolCanary.namespace }}
- name: LLMSANDBOX_NETPOL_CANARY_NAMESPACE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.netpolCanary.target }}
- name: LLMSANDBOX_NETPOL_CANARY_TARGET
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_MAX_RUNNING_TASKS
  value: {{ .Values.maxRunningTasks | quote }}
{{- with .Values.kueue.defaultQueueName }}
- name: LLMSANDBOX_DEFAULT_QUEUE_NAME
  value: {{ . | quote }}
{{- end }}
- name: LLMSANDBOX_MAX_PREEMPTIONS
  value: {{ .Values.kueue.maxPreemptions | quote }}
- name: LLMSANDBOX_ENDPOINT_LIMITS
  value: {{ .Values.endpointLimits | toJson | quote }}
- name: LLMSANDBOX_ADAPTIVE_ADMISSION
  value: {{ .Values.adaptiveAdmission | quote }}
{{- if not (kindIs "invalid" .Values.taskTTLSeconds) }}
- name: LLMSANDBOX_TASK_TTL_SECONDS
  value: {{ .Values.taskTTLSeconds | int64 | quote }}
{{- end }}
- name: LLMSANDBOX_KEEP_FINISHED_PODS
  value: {{ .Values.keepFinishedPods | quote }}
- name: LLMSANDBOX_TOKEN_PRICES
  value: {{ .Values.tokenPrices | toJson | quote }}
- name: LLMSANDBOX_WATCHED_NAMESPACES
  value: {{ .Values.watchedNamespaces | toJson | quote }}
- name: LLMSANDBOX_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
- name: LLMSANDBOX_QUEUE_REFRESH_SECONDS
  value: {{ .Values.queueRefreshSeconds | quote }}
- name: LLMSANDBOX_DEADLINE_GRACE_SECONDS
  value: {{ .Values.deadlineGraceSeconds | quote }}
- name: LLMSANDBOX_EXECD_READY_TIMEOUT_SECONDS
  value: {{ .Values.execdReadyTimeoutSeconds | quote }}
- name: LLMSANDBOX_POD_START_TIMEOUT_SECONDS
  value: {{ .Values.podStartTimeoutSeconds | quote }}
{{- end -}}

{{/* LLMSANDBOX_TASK_SCHEDULING: the scheduling fields of taskPods that are set, as one JSON object. */}}
{{- define "llm-sandbox.taskScheduling" -}}
{{- $scheduling := dict -}}
{{- range $field := list "nodeSelector" "tolerations" "affinity" "priorityClassName" "topologySpreadConstraints" -}}
{{- with index $.Values.taskPods $field -}}
{{- $_ := set $scheduling $field . -}}
{{- end -}}
{{- end -}}
{{- $scheduling | toJson -}}
{{- end -}}
