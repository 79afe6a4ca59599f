{{- define "agentbox.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "agentbox.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agentbox.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "agentbox.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "agentbox.operatorName" -}}{{ include "agentbox.fullname" . }}-operator{{- end -}}
{{- define "agentbox.apiName" -}}{{ include "agentbox.fullname" . }}-api{{- end -}}
{{/* The API's rights inside tenant namespaces: the operator binds it in each one. */}}
{{- define "agentbox.apiTenantRole" -}}{{ include "agentbox.fullname" . }}-api-tenant{{- end -}}

{{- define "agentbox.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "agentbox.fullname" .)) -}}
{{- end -}}
{{- /* What the migration Job reads migrationsUrl from: the user's Secret, else the chart's hook Secret. */ -}}
{{- define "agentbox.migrationsSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database-migrations" (include "agentbox.fullname" .)) -}}
{{- end -}}
{{- define "agentbox.encryptionSecret" -}}
{{- .Values.encryption.existingSecret | default (printf "%s-encryption" (include "agentbox.fullname" .)) -}}
{{- end -}}

{{/* Pod and container security that meets Pod Security Standards "restricted". */}}
{{- define "agentbox.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "agentbox.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
{{- /* Where the API's pods run: its Deployment, and the migration Job and test pod that go with it. */ -}}
{{- define "agentbox.apiPlacement" -}}
{{- $placement := dict -}}
{{- range $key := list "nodeSelector" "tolerations" "affinity" -}}
{{- with get $.Values.api $key }}{{ $_ := set $placement $key . }}{{ end -}}
{{- end -}}
{{- with $placement }}{{ toYaml . }}{{ end -}}
{{- end -}}
