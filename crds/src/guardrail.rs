//! Guardrail: a Bedrock-shaped safety policy (content filters, denied topics, word filters,
//! sensitive-information handling, contextual grounding) applied to prompts and completions.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Condition;
use crate::validation::{Invalid, Validate, Violations};

/// A guardrail policy, in the shape of Bedrock's CreateGuardrail request.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mantle.dev",
    version = "v1alpha1",
    kind = "Guardrail",
    namespaced,
    status = "GuardrailStatus",
    shortname = "gr",
    category = "mantle",
    derive = "PartialEq",
    doc = "A guardrail policy (Bedrock CreateGuardrail shape) applied to prompts and model responses.",
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "Compiled", type_ = "string", json_path = ".status.conditions[?(@.type==\"Compiled\")].status"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Compiled\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.contentPolicy) || has(self.topicPolicy) || has(self.wordPolicy) || has(self.sensitiveInformationPolicy) || has(self.contextualGroundingPolicy)").message("a guardrail needs at least one policy"))]
#[serde(rename_all = "camelCase")]
pub struct GuardrailSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub description: Option<String>,
    /// What the caller sees instead of a blocked prompt.
    #[schemars(length(min = 1, max = 500))]
    pub blocked_input_messaging: String,
    /// What the caller sees instead of a blocked response.
    #[schemars(length(min = 1, max = 500))]
    pub blocked_outputs_messaging: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_policy: Option<ContentPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_policy: Option<TopicPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_policy: Option<WordPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sensitive_information_policy: Option<SensitiveInformationPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contextual_grounding_policy: Option<ContextualGroundingPolicy>,
}

/// Harmful-content classifiers, one filter per category.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContentPolicy {
    #[schemars(length(min = 1, max = 6))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub filters: Vec<ContentFilter>,
}

/// One content category and how strictly it is filtered on each side. `PROMPT_ATTACK` is the
/// prompt-attack (jailbreak and injection) filter; it applies to input only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type != 'PROMPT_ATTACK' || self.outputStrength == 'NONE'").message("the PROMPT_ATTACK filter applies to input only: outputStrength must be NONE").field_path(".outputStrength"))]
#[serde(rename_all = "camelCase")]
pub struct ContentFilter {
    #[serde(rename = "type")]
    pub type_: ContentFilterType,
    pub input_strength: FilterStrength,
    pub output_strength: FilterStrength,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ContentFilterType {
    Sexual,
    Violence,
    Hate,
    Insults,
    Misconduct,
    PromptAttack,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FilterStrength {
    None,
    Low,
    Medium,
    High,
}

/// Subjects the model must not engage with.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicy {
    #[schemars(length(min = 1, max = 30))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub topics: Vec<DeniedTopic>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeniedTopic {
    #[schemars(length(min = 1, max = 100), regex(pattern = r"^[0-9a-zA-Z\-_ !?.]+$"))]
    pub name: String,
    /// What the topic covers, in a sentence or two.
    #[schemars(length(min = 1, max = 200))]
    pub definition: String,
    /// Sample prompts that belong to the topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(length(min = 1, max = 100)))]
    pub examples: Vec<String>,
}

/// Exact words and phrases to block, plus managed lists.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("size(self.words) > 0 || size(self.managedWordLists) > 0").message("a word policy needs words or a managed word list"))]
#[serde(rename_all = "camelCase")]
pub struct WordPolicy {
    #[serde(default)]
    #[schemars(length(max = 10000))]
    pub words: Vec<Word>,
    #[serde(default)]
    #[schemars(length(max = 1))]
    pub managed_word_lists: Vec<ManagedWordList>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct Word {
    #[schemars(length(min = 1, max = 100))]
    pub text: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ManagedWordList {
    #[serde(rename = "type")]
    pub type_: ManagedWordListType,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ManagedWordListType {
    /// Mantle's built-in profanity list.
    Profanity,
}

/// PII detection and custom patterns, each blocked or masked.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("size(self.piiEntities) > 0 || size(self.regexes) > 0").message("a sensitive information policy needs PII entities or regexes"))]
#[serde(rename_all = "camelCase")]
pub struct SensitiveInformationPolicy {
    #[serde(default)]
    #[schemars(length(max = 31))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub pii_entities: Vec<PiiEntity>,
    #[serde(default)]
    #[schemars(length(max = 30))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub regexes: Vec<RegexFilter>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct PiiEntity {
    #[serde(rename = "type")]
    pub type_: PiiEntityType,
    pub action: SensitiveAction,
}

/// A custom pattern (RE2 syntax) treated as sensitive information.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegexFilter {
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1000))]
    pub description: Option<String>,
    /// The pattern. The CEL rule compiles it (an equality, so the error is not absorbed the way
    /// `||` would absorb it), so a pattern that does not compile is rejected by the API server.
    #[schemars(length(min = 1, max = 500))]
    #[x_kube(validation = Rule::new("''.matches(self) == ''.matches(self)").message("pattern must be a valid regular expression"))]
    pub pattern: String,
    pub action: SensitiveAction,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SensitiveAction {
    /// Reject the whole prompt or response.
    Block,
    /// Replace the match with `{TYPE}` and go on.
    Anonymize,
    /// Detect and report only.
    None,
}

/// The PII entity types Bedrock guardrails detect.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PiiEntityType {
    Address,
    Age,
    AwsAccessKey,
    AwsSecretKey,
    CaHealthNumber,
    CaSocialInsuranceNumber,
    CreditDebitCardCvv,
    CreditDebitCardExpiry,
    CreditDebitCardNumber,
    DriverId,
    Email,
    InternationalBankAccountNumber,
    IpAddress,
    LicensePlate,
    MacAddress,
    Name,
    Password,
    Phone,
    Pin,
    SwiftCode,
    UkNationalHealthServiceNumber,
    UkNationalInsuranceNumber,
    UkUniqueTaxpayerReferenceNumber,
    Url,
    Username,
    UsBankAccountNumber,
    UsBankRoutingNumber,
    UsIndividualTaxIdentificationNumber,
    UsPassportNumber,
    UsSocialSecurityNumber,
    VehicleIdentificationNumber,
}

/// Checks that a response is grounded in the supplied source and relevant to the query.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ContextualGroundingPolicy {
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub filters: Vec<GroundingFilter>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct GroundingFilter {
    #[serde(rename = "type")]
    pub type_: GroundingFilterType,
    /// Responses scoring below this are blocked.
    #[schemars(range(min = 0.0, max = 0.99))]
    pub threshold: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GroundingFilterType {
    Grounding,
    Relevance,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GuardrailStatus {
    /// Increases each time the compiled policy changes; requests name it as `guardrailVersion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `Compiled` (False with the reason when a pattern does not compile), `Available`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Validate for GuardrailSpec {
    fn validate(&self) -> Result<(), Invalid> {
        let mut v = Violations::default();
        v.check(
            self.content_policy.is_some()
                || self.topic_policy.is_some()
                || self.word_policy.is_some()
                || self.sensitive_information_policy.is_some()
                || self.contextual_grounding_policy.is_some(),
            "spec",
            "a guardrail needs at least one policy",
        );
        v.check(!self.blocked_input_messaging.is_empty(), "spec.blockedInputMessaging", "must not be empty");
        v.check(!self.blocked_outputs_messaging.is_empty(), "spec.blockedOutputsMessaging", "must not be empty");
        if let Some(p) = &self.content_policy {
            for (i, f) in p.filters.iter().enumerate() {
                v.check(
                    f.type_ != ContentFilterType::PromptAttack || f.output_strength == FilterStrength::None,
                    format!("spec.contentPolicy.filters[{i}].outputStrength"),
                    "the PROMPT_ATTACK filter applies to input only: outputStrength must be NONE",
                );
                let duplicate = p.filters[..i].iter().any(|earlier| earlier.type_ == f.type_);
                v.check(!duplicate, format!("spec.contentPolicy.filters[{i}].type"), "duplicate filter type");
            }
        }
        if let Some(p) = &self.word_policy {
            v.check(
                !p.words.is_empty() || !p.managed_word_lists.is_empty(),
                "spec.wordPolicy",
                "a word policy needs words or a managed word list",
            );
        }
        if let Some(p) = &self.sensitive_information_policy {
            v.check(
                !p.pii_entities.is_empty() || !p.regexes.is_empty(),
                "spec.sensitiveInformationPolicy",
                "a sensitive information policy needs PII entities or regexes",
            );
            for (i, r) in p.regexes.iter().enumerate() {
                if let Err(e) = regex::Regex::new(&r.pattern) {
                    v.check(
                        false,
                        format!("spec.sensitiveInformationPolicy.regexes[{i}].pattern"),
                        format!("pattern must be a valid regular expression: {}", regex_error_summary(&e)),
                    );
                }
            }
        }
        if let Some(p) = &self.contextual_grounding_policy {
            for (i, f) in p.filters.iter().enumerate() {
                v.range(f.threshold, 0.0, 0.99, format!("spec.contextualGroundingPolicy.filters[{i}].threshold"));
            }
        }
        v.finish()
    }
}

/// The last line of a regex compile error ("unclosed group"), without the caret diagram above it.
fn regex_error_summary(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines().last().unwrap_or_default().trim_start_matches("error: ").to_string()
}
